"""Spectral adapters: n trainable coefficients of a 2-D transform of the update.

One mechanism, two bases. The update of a (fan_in, fan_out) kernel is

    FourierFT:  dW = s * Re(IDFT2(Z))                       (basis='fourier')
    LoCA:       dW = s * D_in^T Z D_out = s * IDCT2(Z)      (basis='dct')

where ``Z`` (fan_in, fan_out) is zero except at n fixed locations, which hold
the trainable coefficients (zero at init, so the layer starts as the base),
and ``D_k`` is the orthonormal DCT-II matrix (`lowrank_jax.linalg.dct_matrix`).

* FourierFT: Gao et al., "Parameter-Efficient Fine-Tuning with Discrete
  Fourier Transform" (ICML 2024). Locations are drawn uniformly without
  replacement (PEFT: ``torch.randperm(out * in)`` with a seed). ``dW`` equals
  PEFT's ``FourierFTLayer.get_delta_weight`` transposed to our layout when
  given the same coefficients and locations (tested). Differences from PEFT:
  coefficients start at zero (PEFT's default ``init_weights=False`` draws them
  from N(0, 1), so its layer does not start at the base); locations come from
  ``jax.random.permutation``, not torch's generator; Conv, LinearGeneral and
  Einsum layers are supported through their matrix view.
* LoCA: Du et al., "LoCA: Location-Aware Cosine Adaptation for
  Parameter-Efficient Fine-Tuning" (ICLR 2025), ``W' = W0 + alpha C^T S(a, l)
  D``. The locations start random (or at the top-n of ``|D_in G D_out^T|`` when
  a calibration gradient G is given, ``init='gradient'``) and can be moved by
  `LoCA.update_locations`: the paper's finite-difference estimate of the
  loss gradient with respect to a discrete location. With ``F = dL/dZ = s D_in
  G D_out^T`` (G the dense weight gradient), moving coefficient a_k from (u, v)
  to a neighbour (u', v') changes the loss by about ``a_k (F[u', v'] - F[u,
  v])``; each step moves every coefficient to its best 4-neighbour when that
  lowers the estimate. The central-difference form and the one-cell moves are
  our reading of the paper (its official code was not available to check);
  the alternating schedule (when to call it, when to freeze) is left to the
  training loop.

The forward is ``base(x) + (x dW)`` with ``dW`` formed from the n coefficients
(for the DCT basis one (fan_in, n) x (n, fan_out) product of gathered DCT rows,
no dense Z; one inverse FFT for the Fourier basis); ``W0 + dW`` is never formed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lowrank_jax.adapters import stats
from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers

Array = jax.Array

BASES = ("fourier", "dct")
LOCATION_INITS = ("random", "gradient")


def random_locations(key: Array, fan_in: int, fan_out: int, n: int) -> Array:
  """n distinct flat indices into a (fan_in, fan_out) matrix, uniformly at random."""
  return jax.random.permutation(key, fan_in * fan_out)[:n].astype(jnp.int32)


def spectral_delta(coefficients: Array, locations: Array, shape: tuple[int, int], basis: str,
                   scale: float) -> Array:
  """The (fan_in, fan_out) update of n coefficients at flat ``locations`` (float32)."""
  fan_in, fan_out = shape
  c = coefficients.astype(jnp.float32)
  if basis == "fourier":
    dense = jnp.zeros(fan_in * fan_out, jnp.float32).at[locations].add(c).reshape(shape)
    return scale * jnp.real(jnp.fft.ifft2(dense))
  if basis == "dct":
    rows, cols = locations // fan_out, locations % fan_out
    d_in = linalg.dct_matrix(fan_in)
    d_out = linalg.dct_matrix(fan_out)
    # sum_k c_k d_in[u_k]^T d_out[v_k]: no dense Z, no (fan_in x fan_in) product.
    return scale * (d_in[rows].T @ (c[:, None] * d_out[cols]))
  raise ValueError(f"Unknown basis {basis!r}; known: {BASES}.")


def dct_frequency_gradient(weight_grad: Array, scale: float) -> Array:
  """``dL/dZ = s D_in G D_out^T`` for ``dW = s D_in^T Z D_out`` and dense gradient G."""
  g = weight_grad.astype(jnp.float32)
  return scale * (linalg.dct_matrix(g.shape[0]) @ g @ linalg.dct_matrix(g.shape[1]).T)


def top_locations(scores: Array, n: int) -> Array:
  """Flat indices of the n largest ``|scores|``."""
  return jax.lax.top_k(jnp.abs(scores).reshape(-1), n)[1].astype(jnp.int32)


def finite_difference_step(coefficients: Array, locations: Array, freq_grad: Array) -> Array:
  """New flat locations: each coefficient moves to the 4-neighbour of lowest estimated loss.

  The first-order loss change of moving a_k from (u, v) to (u', v') is
  ``a_k (F[u', v'] - F[u, v])``; a coefficient stays when no neighbour inside
  the matrix lowers it.
  """
  fan_in, fan_out = freq_grad.shape
  rows, cols = locations // fan_out, locations % fan_out
  a = coefficients.astype(jnp.float32)
  here = freq_grad[rows, cols]
  best_rows, best_cols, best_change = rows, cols, jnp.zeros_like(a)
  for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
    r, c = rows + dr, cols + dc
    inside = (r >= 0) & (r < fan_in) & (c >= 0) & (c < fan_out)
    change = a * (freq_grad[jnp.clip(r, 0, fan_in - 1), jnp.clip(c, 0, fan_out - 1)] - here)
    better = inside & (change < best_change)
    best_rows = jnp.where(better, r, best_rows)
    best_cols = jnp.where(better, c, best_cols)
    best_change = jnp.where(better, change, best_change)
  return (best_rows * fan_out + best_cols).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SpectralSpec(adapter_base.AdapterSpec):
  """Shared hyperparameters of the spectral adapters.

  Attributes:
    n_frequency: number n of trainable coefficients, 1 <= n <= fan_in * fan_out.
    scale: the scaling s of the update.
    param_dtype: dtype of the coefficients; None uses the base kernel's.
  """

  basis: ClassVar[str] = ""
  n_frequency: int = 64
  scale: float = 1.0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "n_frequency", self.n_frequency)

  def validate(self, view: layers.LayerView, path: str) -> None:
    entries = view.fan_in * view.fan_out
    if self.n_frequency > entries:
      raise ValueError(
          f"{self.name} at '{path}': n_frequency={self.n_frequency} exceeds the number of entries "
          f"fan_in * fan_out = {view.fan_in} * {view.fan_out} = {entries} of the update.")

  def initial_locations(self, view, key, calibration, path) -> Array:
    return random_locations(key, view.fan_in, view.fan_out, self.n_frequency)

  def build(self, base, *, rngs, calibration=None, path=""):
    view = layers.view_of(base, path)
    self.validate(view, path)
    locations = self.initial_locations(view, rngs.params(), calibration, path)
    return self.adapter_type(base, self, view, path, locations)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.n_frequency


class Spectral(adapter_base.Adapter):
  """A spectral adapter: ``coefficients`` (n,) trainable; ``locations``, n flat indices.

  The locations are a static tuple of ints (part of the graph definition, not
  of the state: integer indices have no place among bfloat16 parameters and
  are never trained); changing them retraces jitted functions.
  """

  def __init__(self, base, spec: SpectralSpec, view, path, locations: Array):
    super().__init__(base, spec, view, path)
    dtype = spec.param_dtype or base.kernel.dtype
    self.coefficients = adapter_base.AdapterParam(jnp.zeros((spec.n_frequency,), dtype))
    self.locations = tuple(int(i) for i in jax.device_get(locations))

  def location_array(self) -> Array:
    return jnp.asarray(self.locations, jnp.int32)

  def delta_matrix(self) -> Array:
    return spectral_delta(self.coefficients[...], self.location_array(),
                          (self.view.fan_in, self.view.fan_out), self.spec.basis, self.spec.scale)

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.base(x, **kwargs)
    delta = self.view.from_matrix(self.delta_matrix()).astype(self.base.kernel.dtype)
    return y + self.view.call_without_bias(self.base, x, kernel=delta, **kwargs).astype(y.dtype)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class FourierFTSpec(SpectralSpec):
  """FourierFT: ``dW = scale * Re(IDFT2(Z))`` with n coefficients at random locations.

  ``scale`` defaults to PEFT's 150 (the IDFT carries a 1 / (fan_in fan_out)
  factor); ``n_frequency`` defaults to 64 (PEFT: 1000) so that it fits small
  layers. ``seed`` (PEFT's ``random_loc_seed``) fixes the locations; None
  draws them from the ``params`` stream of ``rngs``.
  """

  name = "fourierft"
  basis = "fourier"
  scale: float = 150.0
  seed: int | None = None

  def initial_locations(self, view, key, calibration, path):
    key = key if self.seed is None else jax.random.key(self.seed)
    return random_locations(key, view.fan_in, view.fan_out, self.n_frequency)

  @property
  def adapter_type(self):
    return FourierFT


class FourierFT(Spectral):
  """A FourierFT adapter (see `FourierFTSpec` and the module docstring)."""


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoCASpec(SpectralSpec):
  """LoCA: ``dW = scale * D_in^T Z D_out`` with n DCT coefficients at chosen locations.

  Attributes:
    init: 'random' locations, or 'gradient': the top-n of ``|D_in G D_out^T|``
      for the calibration gradient G of the site (``stats.site_stats(...,
      'grad')``).
    scale: the paper's alpha (default 1; the DCT basis is orthonormal, so a
      coefficient's update has Frobenius norm ``scale * |a|``).
  """

  name = "loca"
  basis = "dct"
  init: str = "random"

  def __post_init__(self):
    super().__post_init__()
    if self.init not in LOCATION_INITS:
      raise ValueError(f"{self.name}: unknown init {self.init!r}; known: {LOCATION_INITS}.")

  def initial_locations(self, view, key, calibration, path):
    if self.init == "random":
      return random_locations(key, view.fan_in, view.fan_out, self.n_frequency)
    grad = stats.site_stats(calibration, path, self.name, "grad")
    grad = jnp.asarray(grad).reshape(view.fan_in, view.fan_out)
    return top_locations(dct_frequency_gradient(grad, self.scale), self.n_frequency)

  @property
  def adapter_type(self):
    return LoCA


class LoCA(Spectral):
  """A LoCA adapter (see `LoCASpec` and the module docstring)."""

  def update_locations(self, weight_grad: Array) -> None:
    """One finite-difference location step from the dense (fan_in, fan_out) gradient.

    ``weight_grad`` is dL/dW of the merged weight (e.g. ``grad(loss)`` with
    respect to the base kernel through ``view.to_matrix``).
    """
    expected = (self.view.fan_in, self.view.fan_out)
    if tuple(weight_grad.shape) != expected:
      raise ValueError(f"loca at '{self.path}': weight_grad must have shape {expected} (fan_in, "
                       f"fan_out), got {tuple(weight_grad.shape)}.")
    freq_grad = dct_frequency_gradient(weight_grad, self.spec.scale)
    moved = finite_difference_step(self.coefficients[...], self.location_array(), freq_grad)
    self.locations = tuple(int(i) for i in jax.device_get(moved))

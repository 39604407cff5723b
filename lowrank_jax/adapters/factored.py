"""The three-factor adapter ``dW = s * a @ core @ b`` and the methods it configures.

In the (fan_in, fan_out) layout of `lowrank_jax.adapters.layers.LayerView`
(``y = x W``), with ``k`` the inner rank:

    y = x W0' + s * u(t) * ((x a_eff) core) b_eff (+ bias_delta)

* ``a`` (fan_in, k), ``b`` (k, fan_out): the outer factors. A paper's
  ``B M A`` on an (out, in) weight is our ``a = A^T``, ``core = M^T``,
  ``b = B^T``.
* ``core``: 'identity' (two-factor), 'dense' (k, k), 'diagonal' (k,),
  'lowrank' (``core_left`` (k, q) @ ``core_right`` (q, k)), or a sparse
  pattern 'banded' / 'random' / 'top_k' (trainable values at fixed indices).
* Each of ``a``, ``core``, ``b`` is trainable (`AdapterParam`) or frozen
  (`AdapterBuffer`) according to ``train``. ``tie=True`` makes ``b`` the
  transpose of the first fan_out rows of ``a`` (SingLoRA).
* ``mask_copies = d > 0``: d copies of (a, b) seen through static random
  masks, ``a_eff = [a * M_1^a, ..., a * M_d^a]``, ``b_eff`` stacked likewise,
  so ``dW = sum_i (a * M_i^a)(M_i^b * b)`` (CapaBoost).
* ``factor_dropout = p > 0``: in training, fresh Bernoulli(1 - p) masks on
  the entries of ``a`` and ``b`` (inverted scaling); in evaluation the mean
  of ``ensemble`` fixed masked copies, or the plain factors when
  ``ensemble = 0`` (LoRA Dropout).
* ``residual=True``: at build, ``W0' = W0 - s a core b``, so the layer
  starts at the original function (PiSSA-style; SORSA, SVFit, VectorFit).
* ``magnitude=True``: DoRA's column normalization
  ``W' = m * (W0 + dW) / ||W0 + dW||_c`` with trainable ``m`` (EDoRA).
* ``train`` may include 'bias': a trainable output bias added to the base
  bias (VectorFit).

The forward never forms ``W0 + dW`` (except through DoRA's column norm,
which is computed from the factors). Each registered method below is this
module with other defaults; its docstring gives the formula, the paper and
what differs from the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import stats
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters.dora import dora_column_norm
from lowrank_jax.adapters.dora import dora_effective_matrix
from lowrank_jax.adapters import factored_init
from lowrank_jax.adapters import layers

Array = jax.Array

CORES = ("identity", "dense", "diagonal", "lowrank") + tuple(
    p for p in factored_init.SPARSE_PATTERNS if p != "diagonal")
CORE_INITS = ("zeros", "singular", "weight", "kaiming", "gaussian")
SIGMA_PLACES = ("none", "a", "b")
TRAINABLE = ("a", "core", "b", "bias", "magnitude")


def _choice(value, allowed, what: str, name: str) -> None:
  if value not in allowed:
    raise ValueError(f"{name}: {what} must be one of {list(allowed)}, got {value!r}.")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class FactoredSpec(adapter_base.AdapterSpec):
  """Hyperparameters of the generic three-factor adapter (module docstring).

  Attributes:
    rank: inner rank k; None means min(fan_in, fan_out) (full SVD).
    alpha: the scale is ``alpha / rank``; None means scale 1.
    init: source of the outer factors, one of `factored_init.OUTER_INITS`.
    sigma: where the singular values of an SVD init go: 'none' (dropped;
      use core_init='singular' to put them in the core), 'a' (a = U S) or
      'b' (b = S V^T).
    core: 'identity', 'dense', 'diagonal', 'lowrank', 'banded', 'random',
      'top_k'.
    core_init: 'zeros', 'singular' (diag of the init's singular values),
      'weight' (the init's core read from W0, Nystrom/skeleton), 'kaiming',
      'gaussian' (N(0, core_std^2)).
    core_k: band half-width ('banded'; 'random' takes as many entries as that
      band has) or the number of entries ('top_k').
    core_rank: inner rank q of a 'lowrank' core.
    core_std: standard deviation of core_init='gaussian'.
    factor_std: standard deviation of init='gaussian' (None: 1/sqrt(fan_in) for
      a, 1/sqrt(fan_out) for b).
    train: which of 'a', 'core', 'b', 'bias', 'magnitude' are trainable.
    residual: replace W0 by W0 - s a core b at build.
    magnitude: DoRA magnitude/direction split (EDoRA); needs 'magnitude' in
      train to train m.
    tie: b = a[:fan_out]^T with a of shape (max(fan_in, fan_out), k).
    ramp_steps: T of the ramp u(t) = min(t / T, 1); 0 means u = 1. The step
      t is set by `set_step` or the `RampEvent`.
    mask_copies, mask_density: CapaBoost's number of masked copies and the
      keep probability of their static masks (0 copies: no masks).
    factor_dropout, ensemble: LoRA Dropout's rate and test-time ensemble size.
    update_lr: learning rate of the approximate first update (gradient_svd).
    detach_norm: treat DoRA's column norm as a constant in the backward pass.
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "factored"
  rank: int | None = 4
  alpha: float | None = None
  init: str = "svd"
  sigma: str = "none"
  core: str = "dense"
  core_init: str = "zeros"
  core_k: int = 1
  core_rank: int = 2
  core_std: float = 1e-5
  factor_std: float | None = 0.02
  train: tuple[str, ...] = ("core",)
  residual: bool = False
  magnitude: bool = False
  tie: bool = False
  ramp_steps: int = 0
  mask_copies: int = 0
  mask_density: float = 0.5
  factor_dropout: float = 0.0
  ensemble: int = 0
  update_lr: float = 1e-3
  detach_norm: bool = True
  param_dtype: Any = None

  def __post_init__(self):
    name = self.name
    layers.check_positive_int(name, "rank", self.rank, allow_none=True)
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"{name}: alpha must be > 0 (or None for scale 1), got {self.alpha!r}.")
    _choice(self.init, factored_init.OUTER_INITS, "init", name)
    _choice(self.sigma, SIGMA_PLACES, "sigma", name)
    _choice(self.core, CORES, "core", name)
    _choice(self.core_init, CORE_INITS, "core_init", name)
    layers.check_positive_int(name, "core_k", self.core_k)
    layers.check_positive_int(name, "core_rank", self.core_rank)
    if not isinstance(self.train, tuple) or any(t not in TRAINABLE for t in self.train):
      raise ValueError(f"{name}: train must be a tuple of names from {list(TRAINABLE)}, "
                       f"got {self.train!r}.")
    if not self.train:
      raise ValueError(f"{name}: train must name at least one trainable leaf.")
    if self.core == "identity" and "core" in self.train:
      raise ValueError(f"{name}: core='identity' has no core to train; drop 'core' from train.")
    if "magnitude" in self.train and not self.magnitude:
      raise ValueError(f"{name}: train has 'magnitude' but magnitude=False.")
    if self.tie and (self.core != "identity" or "b" in self.train or self.mask_copies
                     or self.factor_dropout or self.init not in ("kaiming", "gaussian", "random")):
      raise ValueError(f"{name}: tie=True needs core='identity', no 'b' in train (b is a), no "
                       "masks or factor dropout, and a random init ('kaiming', 'gaussian', "
                       "'random').")
    if self.core_init == "singular" and self.init not in factored_init.WITH_SIGMA:
      raise ValueError(f"{name}: core_init='singular' needs an SVD init "
                       f"({sorted(factored_init.WITH_SIGMA)}), got init={self.init!r}.")
    if self.core_init == "weight" and self.init not in ("nystrom", "skeleton"):
      raise ValueError(f"{name}: core_init='weight' needs init='nystrom' or 'skeleton'.")
    if self.sigma != "none" and self.init not in factored_init.WITH_SIGMA:
      raise ValueError(f"{name}: sigma={self.sigma!r} needs an SVD init.")
    if self.core in ("banded", "random", "top_k", "lowrank") and self.core_init not in (
        "zeros", "gaussian"):
      raise ValueError(f"{name}: a {self.core!r} core starts from core_init 'zeros' or "
                       f"'gaussian', got {self.core_init!r}.")
    if self.ramp_steps < 0:
      raise ValueError(f"{name}: ramp_steps must be >= 0, got {self.ramp_steps!r}.")
    if self.ramp_steps and self.residual:
      raise ValueError(f"{name}: residual=True subtracts the initial update, which a ramp "
                       "(ramp_steps > 0) would scale; use one or the other.")
    if self.mask_copies < 0 or not 0.0 < self.mask_density <= 1.0:
      raise ValueError(f"{name}: mask_copies must be >= 0 and mask_density in (0, 1], got "
                       f"{self.mask_copies!r}, {self.mask_density!r}.")
    if not 0.0 <= self.factor_dropout < 1.0 or self.ensemble < 0:
      raise ValueError(f"{name}: factor_dropout must be in [0, 1) and ensemble >= 0, got "
                       f"{self.factor_dropout!r}, {self.ensemble!r}.")
    if (self.mask_copies or self.factor_dropout) and self.core != "identity":
      raise ValueError(f"{name}: masked copies and factor dropout need core='identity'.")
    if self.mask_copies and self.factor_dropout:
      raise ValueError(f"{name}: use either mask_copies (CapaBoost) or factor_dropout "
                       "(LoRA Dropout), not both.")

  # -- derived quantities -------------------------------------------------------
  def inner_rank(self, fan_in: int, fan_out: int) -> int:
    return min(fan_in, fan_out) if self.rank is None else self.rank

  @property
  def scale(self) -> float:
    if self.alpha is None or self.rank is None:
      return 1.0 if self.alpha is None else float(self.alpha)
    return self.alpha / self.rank

  @property
  def calibration_needs(self) -> tuple[str, ...]:
    """The `lowrank_jax.stats.SiteStats` fields `build` reads."""
    return ("grad",) if self.init == "gradient_svd" else ()

  @property
  def identity_at_init(self) -> bool:
    """Whether the adapted layer starts at the base function."""
    if self.residual:
      return True
    if self.tie:
      return self.ramp_steps > 0
    zero_core = self.core != "identity" and self.core_init == "zeros"
    zero_b = self.init in ("kaiming", "orthogonal")
    return zero_core or zero_b

  def validate(self, base: nnx.Module, view: layers.LayerView, path: str) -> None:
    """Checks that need the layer; errors name the layer path."""
    where = f"{self.name} at '{path}'"
    fan_in, fan_out = view.fan_in, view.fan_out
    k = self.inner_rank(fan_in, fan_out)
    limit = max(fan_in, fan_out) if self.tie else min(fan_in, fan_out)
    if k > limit:
      raise ValueError(f"{where}: rank={k} exceeds {'max' if self.tie else 'min'}(fan_in, fan_out) "
                       f"= {limit} for a ({fan_in}, {fan_out}) layer.")
    if self.init == "orthogonal" and k > fan_in:
      raise ValueError(f"{where}: init='orthogonal' needs rank <= fan_in = {fan_in}, got {k}.")
    if self.core == "top_k":
      if self.core_k > k * k:
        raise ValueError(f"{where}: core='top_k' with core_k={self.core_k} exceeds the {k * k} "
                         f"entries of the {k} x {k} core.")
      if fan_in != fan_out or self.init not in factored_init.WITH_SIGMA:
        raise ValueError(f"{where}: core='top_k' ranks the alignment of left and right singular "
                         f"vectors, which needs an SVD init and a square layer; got init="
                         f"{self.init!r} on a ({fan_in}, {fan_out}) layer.")
    if self.core == "lowrank" and self.core_rank > k:
      raise ValueError(f"{where}: core_rank={self.core_rank} exceeds the core size {k}.")
    if self.magnitude and "bias" in self.train:
      raise ValueError(f"{where}: a trainable bias is not supported with magnitude=True.")
    base_bias = getattr(base, "bias", None)
    if ("bias" in self.train and view.kind == "einsum"
        and (base_bias is None or base_bias.size != view.fan_out)):
      raise ValueError(f"{where}: a trainable bias on an nnx.Einsum layer needs a base bias with "
                       f"fan_out = {view.fan_out} entries to merge into.")

  @property
  def adapter_type(self) -> type["Factored"]:
    return _adapter_class(self.identity_at_init, not (self.magnitude or "bias" in self.train))

  def build(self, base, *, rngs, calibration=None, path=""):
    view = layers.view_of(base, path)
    self.validate(base, view, path)
    grad = None
    if self.init == "gradient_svd":
      grad = stats.site_stats(calibration, path, self.name, "grad")
      if tuple(grad.shape) != (view.fan_in, view.fan_out):
        raise ValueError(f"{self.name} at '{path}': calibration grad has shape {tuple(grad.shape)}, "
                         f"expected (fan_in, fan_out) = ({view.fan_in}, {view.fan_out}).")
    return self.adapter_type(base, self, view, path, rngs=rngs, grad=grad)

  def core_size(self, k: int) -> int:
    if self.core == "identity":
      return 0
    if self.core == "dense":
      return k * k
    if self.core == "lowrank":
      return 2 * k * self.core_rank
    pattern = "diagonal" if self.core == "diagonal" else self.core
    return factored_init.pattern_size(pattern, k, self.core_k)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    k = self.inner_rank(fan_in, fan_out)
    sizes = {
        "a": (max(fan_in, fan_out) if self.tie else fan_in) * k,
        "b": k * fan_out,
        "core": self.core_size(k),
        "bias": fan_out,
        "magnitude": fan_out,
    }
    return sum(sizes[t] for t in self.train)


# -- the module -----------------------------------------------------------------
def _leaf(value: Array, trainable: bool) -> nnx.Variable:
  return adapter_base.AdapterParam(value) if trainable else adapter_base.AdapterBuffer(value)


class Factored(adapter_base.Adapter):
  """The three-factor adapter (module docstring).

  Leaves: ``a``, ``b`` (``b`` absent when tied), the core (``core`` values, or
  ``core_left``/``core_right`` for a low-rank core, with ``core_rows``/
  ``core_cols`` index buffers for sparse patterns), optional ``mask_a``/
  ``mask_b`` (static masks), ``magnitude``, ``bias_delta``, ``step`` (ramp).
  """

  def __init__(self, base: nnx.Module, spec: FactoredSpec, view: layers.LayerView,
               path: str = "", *, rngs: nnx.Rngs, grad: Array | None = None):
    super().__init__(base, spec, view, path)
    fan_in, fan_out = view.fan_in, view.fan_out
    k = spec.inner_rank(fan_in, fan_out)
    dtype = spec.param_dtype or base.kernel.dtype
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    key_outer, key_core, key_pattern, key_masks = jax.random.split(rngs.params(), 4)
    # A tied factor has max(fan_in, fan_out) rows; its (random) init only reads the shape.
    shape_source = jnp.zeros((max(fan_in, fan_out), fan_out)) if spec.tie else w0
    outer = factored_init.outer_factors(spec.init, key_outer, shape_source, k, grad=grad,
                                        update_lr=spec.update_lr, std=spec.factor_std)
    a, b = outer.a, outer.b
    if spec.sigma == "a":
      a = a * outer.sigma[None, :]
    elif spec.sigma == "b":
      b = outer.sigma[:, None] * b
    train = set(spec.train)
    self.a = _leaf(a.astype(dtype), "a" in train)
    self.b = None if spec.tie else _leaf(b.astype(dtype), "b" in train)

    # Core.
    core_trainable = "core" in train
    core = core_left = core_right = core_rows = core_cols = None
    if spec.core == "lowrank":
      left = factored_init.kaiming_uniform(key_core, (k, spec.core_rank))
      core_left = _leaf(left.astype(dtype), core_trainable)
      core_right = _leaf(self._core_values(spec, key_core, (spec.core_rank, k), outer)
                         .astype(dtype), core_trainable)
    elif spec.core in ("banded", "random", "top_k"):
      rows_idx, cols_idx = factored_init.sparse_pattern(spec.core, key_pattern, k, spec.core_k,
                                                        a=outer.a, b=outer.b)
      core_rows = adapter_base.AdapterBuffer(rows_idx)
      core_cols = adapter_base.AdapterBuffer(cols_idx)
      values = self._core_values(spec, key_core, (rows_idx.shape[0],), outer)
      core = _leaf(values.astype(dtype), core_trainable)
    elif spec.core in ("dense", "diagonal"):
      shape = (k, k) if spec.core == "dense" else (k,)
      core = _leaf(self._core_values(spec, key_core, shape, outer).astype(dtype), core_trainable)
    self.core, self.core_left, self.core_right = core, core_left, core_right
    self.core_rows, self.core_cols = core_rows, core_cols

    # Masks.
    mask_a = mask_b = None
    copies = spec.mask_copies or (spec.ensemble if spec.factor_dropout else 0)
    if copies:
      keep = spec.mask_density if spec.mask_copies else 1.0 - spec.factor_dropout
      ka, kb = jax.random.split(key_masks)
      mask_a = jax.random.bernoulli(ka, keep, (fan_in, copies * k))
      mask_b = jax.random.bernoulli(kb, keep, (copies * k, fan_out))
      mask_a = adapter_base.AdapterBuffer(mask_a.astype(dtype))
      mask_b = adapter_base.AdapterBuffer(mask_b.astype(dtype))
    self.mask_a, self.mask_b = mask_a, mask_b
    self.dropout = (nnx.Dropout(spec.factor_dropout, rngs=rngs) if spec.factor_dropout > 0
                    else None)
    self.step = (adapter_base.AdapterBuffer(jnp.zeros((), jnp.int32)) if spec.ramp_steps
                 else None)

    if spec.residual:
      first, second = self.factor_pair()
      w_res = w0 - self.scale * (first @ second)
      base.kernel[...] = view.from_matrix(w_res).astype(base.kernel.dtype)
    magnitude = None
    if spec.magnitude:
      norm = dora_column_norm(view.to_matrix(base.kernel[...]), *self.factor_pair(), spec.scale)
      magnitude = _leaf(norm.astype(dtype), "magnitude" in train)
    self.magnitude = magnitude
    self.bias_delta = (adapter_base.AdapterParam(jnp.zeros(view.out_shape, dtype))
                       if "bias" in train else None)

  @staticmethod
  def _core_values(spec: FactoredSpec, key: Array, shape: tuple[int, ...],
                   outer: factored_init.OuterFactors) -> Array:
    if spec.core_init == "zeros":
      return jnp.zeros(shape, jnp.float32)
    if spec.core_init == "gaussian":
      return spec.core_std * jax.random.normal(key, shape, jnp.float32)
    if spec.core_init == "kaiming":
      return factored_init.kaiming_uniform(key, shape) if len(shape) == 2 else (
          factored_init.kaiming_uniform(key, (shape[0], 1))[:, 0])
    if spec.core_init == "singular":
      return jnp.diag(outer.sigma) if len(shape) == 2 else outer.sigma
    return outer.core if len(shape) == 2 else jnp.diagonal(outer.core)  # 'weight'

  # -- effective factors ---------------------------------------------------------
  @property
  def ramp(self) -> Array | float:
    """u(t) = min(t / T, 1), or 1 without a ramp."""
    if self.step is None:
      return 1.0
    return jnp.minimum(self.step[...].astype(jnp.float32) / self.spec.ramp_steps, 1.0)

  def outer_factors(self) -> tuple[Array, Array]:
    """(a_eff, b_eff) with ties, static masks and (in training) factor dropout."""
    a = self.a[...]
    fan_in, fan_out = self.view.fan_in, self.view.fan_out
    stochastic = self.dropout is not None and not self.dropout.deterministic
    if stochastic:
      a = self.dropout(a)
    if self.spec.tie:
      a, b = a[:fan_in], a[:fan_out].T
    else:
      b = self.dropout(self.b[...]) if stochastic else self.b[...]
    if self.mask_a is not None and not stochastic:
      copies = self.mask_a.shape[1] // a.shape[1]
      a = jnp.tile(a, (1, copies)) * self.mask_a[...].astype(a.dtype)
      b = jnp.tile(b, (copies, 1)) * self.mask_b[...].astype(b.dtype)
      if self.spec.factor_dropout:  # ensemble mean of inverted-dropout copies
        keep = 1.0 - self.spec.factor_dropout
        a = a / keep
        b = b / (keep * copies)
    return a, b

  def core_matrix(self) -> Array | None:
    """The core as a dense (k, k) float32 matrix (None for 'identity')."""
    spec = self.spec
    if spec.core == "identity":
      return None
    if spec.core == "dense":
      return self.core[...].astype(jnp.float32)
    if spec.core == "diagonal":
      return jnp.diag(self.core[...].astype(jnp.float32))
    if spec.core == "lowrank":
      return self.core_left[...].astype(jnp.float32) @ self.core_right[...].astype(jnp.float32)
    k = self.a.shape[1]
    dense = jnp.zeros((k, k), jnp.float32)
    return dense.at[self.core_rows[...], self.core_cols[...]].add(self.core[...].astype(jnp.float32))

  def apply_core(self, z: Array) -> Array:
    """``z @ core`` on the rank axis (last) of z without forming sparse cores."""
    spec = self.spec
    if spec.core == "identity":
      return z
    if spec.core == "dense":
      return z @ self.core[...].astype(z.dtype)
    if spec.core == "diagonal":
      return z * self.core[...].astype(z.dtype)
    if spec.core == "lowrank":
      return (z @ self.core_left[...].astype(z.dtype)) @ self.core_right[...].astype(z.dtype)
    rows, cols = self.core_rows[...], self.core_cols[...]
    products = z[..., rows] * self.core[...].astype(z.dtype)
    return jnp.zeros_like(z).at[..., cols].add(products)

  def factor_pair(self) -> tuple[Array, Array]:
    """(a_eff, core @ b_eff): the update is ``s * u * first @ second``, float32."""
    a, b = self.outer_factors()
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    core = self.core_matrix()
    return a, (b if core is None else core @ b)

  # -- protocol ------------------------------------------------------------------
  @property
  def replaces_base_kernel(self) -> bool:
    return self.spec.residual

  @property
  def scale(self) -> Array | float:
    return self.spec.scale * self.ramp

  def low_rank_output(self, x: Array, **kwargs) -> Array:
    a, b = self.outer_factors()
    z = self.view.project_in(self.base, x, a, **kwargs)
    z = self.apply_core(z)
    return self.view.project_out((self.scale * z).astype(z.dtype), b)

  def delta_matrix(self) -> Array:
    if self.magnitude is not None:
      return self.effective_matrix() - self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    first, second = self.factor_pair()
    return self.scale * (first @ second)

  def effective_matrix(self) -> Array:
    if self.magnitude is None:
      return super().effective_matrix()
    first, second = self.factor_pair()
    w0 = self.view.to_matrix(self.base.kernel[...])
    return dora_effective_matrix(w0, first, second, self.scale, self.magnitude[...])

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    low_rank = self.low_rank_output(x, **kwargs)
    if self.magnitude is None:
      y = self.base(x, **kwargs)
      y = y + low_rank.astype(y.dtype)
      if self.bias_delta is not None:
        y = y + self.view.broadcast_out(self.bias_delta[...].reshape(-1), y.ndim).astype(y.dtype)
      return y
    w0 = self.view.to_matrix(self.base.kernel[...])
    norm = dora_column_norm(w0, *self.factor_pair(), self.scale)
    if self.spec.detach_norm:
      norm = jax.lax.stop_gradient(norm)
    y_base = self.view.call_without_bias(self.base, x, **kwargs)
    gain = self.view.broadcast_out(self.magnitude[...].astype(jnp.float32) / norm, y_base.ndim)
    y = gain * (y_base.astype(jnp.float32) + low_rank.astype(jnp.float32))
    bias = self.view.bias(self.base, y.ndim)
    y = y if bias is None else y + bias
    return y.astype(y_base.dtype)

  def merge(self) -> nnx.Module:
    merged = super().merge()
    if self.bias_delta is not None:
      delta = self.bias_delta[...].reshape(-1)
      if merged.bias is None:
        merged.bias = nnx.Param(delta.reshape(self.view.out_shape).astype(merged.kernel.dtype))
        merged.use_bias = True
      else:
        bias = merged.bias[...]
        merged.bias[...] = (bias + delta.reshape(bias.shape)).astype(bias.dtype)
    return merged


@functools.cache
def _adapter_class(identity_at_init: bool, additive: bool) -> type[Factored]:
  """`Factored` with the class attributes of one configuration."""
  if identity_at_init and additive:
    return Factored
  name = "Factored" + ("" if identity_at_init else "NotIdentity") + ("" if additive else "NonAdditive")
  return type(name, (Factored,), {"identity_at_init": identity_at_init, "additive": additive,
                                  "__doc__": Factored.__doc__, "__module__": __name__})


# -- ramp u(t) --------------------------------------------------------------------
def set_step(model: nnx.Module, step: int) -> None:
  """Set the ramp step t of every three-factor adapter with a ramp (SingLoRA)."""
  from lowrank_jax.attach import adapters as list_adapters  # attach imports this package
  for _, adapter in list_adapters(model):
    if isinstance(adapter, Factored) and adapter.step is not None:
      adapter.step[...] = jnp.asarray(step, jnp.int32)


@dataclasses.dataclass(frozen=True)
class RampEvent:
  """The `lowrank_jax.reparam.events.Event` that advances SingLoRA's ramp u(t).

  Due after every step up to ``ramp_steps``; sets t = step in every adapter.
  """

  ramp_steps: int

  def due(self, step: int) -> bool:
    return step <= self.ramp_steps

  def __call__(self, model, opt_state, step):
    set_step(model, step)
    return model, opt_state

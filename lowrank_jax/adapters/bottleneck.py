"""Bottleneck and magnitude-direction adapters: AdapterTune and MAP.

* AdapterTune: "Zero-Initialized Low-Rank Adapters for Frozen Vision
  Transformers" (2025), a Houlsby-style residual bottleneck on the layer
  output ``h = base(x)``:

      y = h + act(h D) U,   D (fan_out, r), U (r, fan_out), U = 0 at init

  (the paper's ``h <- h + U sigma(D h)`` in row-vector layout). U = 0 makes the
  layer equal to the base at init. The paper inserts the bottleneck after a
  transformer block; here it wraps any linear-like layer (attach it to a
  block's output projection for the paper's placement). With a nonlinear
  ``activation`` it cannot be folded into a kernel: ``mergeable = False`` and
  `merge` raises. Differences: the paper's placement and head training are
  left to the caller; D is initialized like PEFT's LoRA A (kaiming-uniform).

* MAP: Si et al., "MAP: Revisiting Weight Decomposition for Low-Rank
  Adaptation" (2025). The kernel is read as one vector:

      W' = alpha * W0 / ||W0||_F + beta * dW / ||dW||_F,   dW = A B (LoRA factors)

  with trainable scalars alpha (init ``||W0||_F``) and beta. Both are stored
  relative to ``||W0||_F`` (``alpha = ||W0||_F * alpha_rel``, same for beta), a
  reparameterization of the paper's scalars that leaves the function class
  unchanged and gives them optimizer steps on the scale of the weight (with
  Adam, a raw alpha of size ||W0|| would move by lr per step). ``||A B||_F^2 =
  sum((A^T A) * (B B^T))`` costs O(r^2 (fan_in + fan_out)) and the forward is
  ``(alpha / ||W0||) x W0 + (beta / ||dW||) (x A) B + bias``, without forming
  ``dW``. Initialization (our choice; the paper's is not stated in the
  sources we could check): alpha_rel = 1, beta = 0 and a nonzero Gaussian B (std
  ``init_scale``), so W' = W0 at init (``identity_at_init`` holds) while the
  direction dW / ||dW|| is defined and beta gets a gradient from the first
  step (with LoRA's B = 0 the direction would be 0/0 and, with beta = 0,
  neither beta nor B would move). Not additive: the update rescales W0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters import layers

Array = jax.Array

ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu, "tanh": jnp.tanh,
               "identity": lambda z: z}



# -- AdapterTune ----------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class AdapterTuneSpec(adapter_base.AdapterSpec):
  """AdapterTune hyperparameters.

  Attributes:
    rank: bottleneck width r, 1 <= r <= fan_out.
    activation: one of 'gelu', 'relu', 'silu', 'tanh', 'identity'.
    param_dtype: dtype of D and U; None uses the base kernel's.
  """

  name = "adaptertune"
  rank: int = 4
  activation: str = "gelu"
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"{self.name}: unknown activation {self.activation!r}; known: "
                       f"{sorted(ACTIVATIONS)}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    layers.check_rank_fits(self.name, path, self.rank, view.fan_out, "fan_out")
    return AdapterTune(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return 2 * self.rank * fan_out


class AdapterTune(adapter_base.Adapter):
  """``y = h + act(h D) U`` on the output features of the base layer.

  Leaves: ``down`` D (fan_out, r), ``up`` U (r, fan_out), zero at init.
  """

  mergeable: ClassVar[bool] = False
  additive: ClassVar[bool] = False

  def __init__(self, base, spec: AdapterTuneSpec, view, path="", *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = spec.param_dtype or base.kernel.dtype
    down = lora_init._kaiming_uniform_a(rngs.params(), view.fan_out, spec.rank)
    self.down = adapter_base.AdapterParam(down.astype(dtype))
    self.up = adapter_base.AdapterParam(jnp.zeros((spec.rank, view.fan_out), dtype))

  def _feature_axes(self, ndim: int) -> list[int]:
    """Positions of the output-feature axes in an output of rank ``ndim``, in kernel order."""
    if self.view.kind != "einsum":
      return list(range(ndim - len(self.view.out_shape), ndim))
    _, _, out = self.view.einsum
    n_ellipsis = ndim - (len(out) - out.count("..."))
    expanded = []
    for token in out:
      expanded.extend([None] * n_ellipsis if token == "..." else [token])
    return [expanded.index(t) for t in self.view.out_labels]

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    h = self.base(x, **kwargs)
    features = self._feature_axes(h.ndim)
    order = [i for i in range(h.ndim) if i not in features] + features
    moved = jnp.transpose(h, order)
    rows = moved.reshape(moved.shape[: h.ndim - len(features)] + (self.view.fan_out,))
    act = ACTIVATIONS[self.spec.activation]
    z = act(rows.astype(jnp.float32) @ self.down[...].astype(jnp.float32))
    rows = rows + (z @ self.up[...].astype(jnp.float32)).astype(rows.dtype)
    inverse = [order.index(i) for i in range(h.ndim)]
    return jnp.transpose(rows.reshape(moved.shape), inverse)

  def delta_matrix(self) -> Array:
    raise ValueError(f"adaptertune at '{self.path}' is not mergeable: the bottleneck "
                     f"{self.spec.activation}(h D) U is a function of the layer output, not a kernel update.")

  def effective_matrix(self) -> Array:
    return self.delta_matrix()

  def merge(self) -> nnx.Module:
    return self.delta_matrix()


# -- MAP ------------------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class MAPSpec(adapter_base.AdapterSpec):
  """MAP hyperparameters (inner update: LoRA factors A (fan_in, r), B (r, fan_out)).

  Attributes:
    rank: r of the inner LoRA, 1 <= r <= min(fan_in, fan_out).
    init_scale: std of the Gaussian init of B (nonzero, see the module docstring).
    eps: added to ||dW||_F.
    param_dtype: dtype of the adapter parameters; None uses the base kernel's.
  """

  name = "map"
  rank: int = 8
  init_scale: float = 0.02
  eps: float = 1e-8
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if not self.init_scale > 0:
      raise ValueError(f"{self.name}: init_scale must be > 0, got {self.init_scale!r}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    layers.check_rank_fits_layer(self.name, path, self.rank, view)
    return MAP(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out) + 2


def lora_frobenius_norm(a: Array, b: Array) -> Array:
  """``||A B||_F`` from ``sum((A^T A) * (B B^T))``, without forming A B (float32)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  return jnp.sqrt(jnp.maximum(jnp.sum((a.T @ a) * (b @ b.T)), 0.0))


class MAP(adapter_base.Adapter):
  """``W' = alpha W0 / ||W0||_F + beta A B / ||A B||_F``.

  Leaves: ``lora_a`` (fan_in, r), ``lora_b`` (r, fan_out), scalars
  ``alpha_rel`` and ``beta_rel`` (alpha / ||W0||_F, beta / ||W0||_F); the
  buffer ``base_norm`` = ||W0||_F.
  """

  additive: ClassVar[bool] = False

  def __init__(self, base, spec: MAPSpec, view, path="", *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = spec.param_dtype or base.kernel.dtype
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    norm = jnp.linalg.norm(w0)
    a = lora_init._kaiming_uniform_a(rngs.params(), view.fan_in, spec.rank)
    b = spec.init_scale * jax.random.normal(rngs.params(), (spec.rank, view.fan_out))
    self.lora_a = adapter_base.AdapterParam(a.astype(dtype))
    self.lora_b = adapter_base.AdapterParam(b.astype(dtype))
    self.alpha_rel = adapter_base.AdapterParam(jnp.ones((), dtype))
    self.beta_rel = adapter_base.AdapterParam(jnp.zeros((), dtype))
    self.base_norm = adapter_base.AdapterBuffer(norm.astype(dtype))

  def coefficients(self) -> tuple[Array, Array]:
    """(alpha / ||W0||, beta / ||A B||): the scalings of W0 and of A B."""
    beta = self.beta_rel[...].astype(jnp.float32) * self.base_norm[...].astype(jnp.float32)
    delta_norm = lora_frobenius_norm(self.lora_a[...], self.lora_b[...]) + self.spec.eps
    return self.alpha_rel[...].astype(jnp.float32), beta / delta_norm

  def effective_matrix(self) -> Array:
    base_scale, delta_scale = self.coefficients()
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    return base_scale * w0 + delta_scale * (self.lora_a[...].astype(jnp.float32)
                                            @ self.lora_b[...].astype(jnp.float32))

  def delta_matrix(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    return self.effective_matrix() - w0

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    base_scale, delta_scale = self.coefficients()
    y = self.view.call_without_bias(self.base, x, **kwargs)
    z = self.view.project_in(self.base, x, self.lora_a[...], **kwargs)
    low_rank = self.view.project_out(delta_scale.astype(z.dtype) * z, self.lora_b[...])
    y = base_scale.astype(y.dtype) * y + low_rank.astype(y.dtype)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

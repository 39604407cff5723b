"""LoRA: low-rank adaptation of a frozen linear-like layer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021):

    y = x W0 + s * (dropout(x) A) B (+ b_lora),   A (fan_in, r), B (r, fan_out)

with ``s = alpha / r``, or ``s = alpha / sqrt(r)`` for rsLoRA (Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023). The
initializations (PEFT's kaiming-uniform default, gaussian, PiSSA, MiLoRA,
OLoRA) are in `lowrank_jax.adapters.init`. The forward never forms
``W0 + s A B``; `merge` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters import layers

Array = jax.Array


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
  """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: Array, b: Array, scale: float) -> Array:
  """The LoRA update ``s * A @ B`` in (fan_in, fan_out) layout, in float32."""
  return scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoRASpec(adapter_base.AdapterSpec):
  """LoRA hyperparameters.

  Attributes:
    rank: r >= 1; weight-aware inits need r <= min(fan_in, fan_out).
    alpha: scaling numerator; None means alpha = r (scale 1 for plain LoRA).
    rslora: use ``alpha / sqrt(r)`` instead of ``alpha / r``.
    init: 'default' (PEFT: kaiming-uniform A, zero B), 'gaussian', 'pissa',
      'pissa_niter_<k>', 'milora', 'olora'.
    dropout: dropout rate on the adapter input, in [0, 1).
    use_bias: add a trainable bias on the adapter path (PEFT's lora_bias).
    param_dtype: dtype of the adapter parameters; None uses the base kernel's.
  """

  name = "lora"
  rank: int = 8
  alpha: float | None = None
  rslora: bool = False
  init: str = "default"
  dropout: float = 0.0
  use_bias: bool = False
  param_dtype: Any = None

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ValueError(f"{self.name}: rank must be a positive integer, got {self.rank!r}.")
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"{self.name}: alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout!r}.")
    lora_init.check_init(self.init)

  @property
  def scale(self) -> float:
    return lora_scale(self.rank if self.alpha is None else self.alpha, self.rank, self.rslora)

  def validate(self, view: layers.LayerView, path: str) -> None:
    """Checks that need the layer's shape; errors name the layer path."""
    limit = min(view.fan_in, view.fan_out)
    if lora_init.is_weight_aware(self.init) and self.rank > limit:
      raise ValueError(
          f"{self.name} at '{path}': rank={self.rank} exceeds min(fan_in, fan_out) = "
          f"min({view.fan_in}, {view.fan_out}) = {limit}, the largest rank init={self.init!r} "
          "can take from the weight's decomposition.")
    if self.use_bias and view.kind == "einsum":
      raise ValueError(f"{self.name} at '{path}': use_bias is not supported on nnx.Einsum layers.")

  @property
  def adapter_type(self) -> type["LoRA"]:
    """The adapter module this spec builds (subclass specs return their own)."""
    return LoRA

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    self.validate(view, path)
    return self.adapter_type(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out) + (fan_out if self.use_bias else 0)


class LoRA(adapter_base.Adapter):
  """A LoRA adapter around a frozen base layer (see the module docstring).

  Leaves: ``lora_a`` (fan_in, r), ``lora_b`` (r, fan_out), optional
  ``lora_bias`` (fan_out features, in the kernel's output shape).
  """

  def __init__(self, base: nnx.Module, spec: LoRASpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    factors = lora_init.lora_factors(spec.init, rngs.params(), w0, spec.rank, spec.scale)
    if factors.residual is not None:
      base.kernel[...] = view.from_matrix(factors.residual).astype(base.kernel.dtype)
    dtype = spec.param_dtype or base.kernel.dtype
    sharding = adapter_base.sharding_for_factors(base, view)
    self.lora_a = adapter_base.AdapterParam(factors.a.astype(dtype), **sharding["a"])
    self.lora_b = adapter_base.AdapterParam(factors.b.astype(dtype), **sharding["b"])
    self.lora_bias = (adapter_base.AdapterParam(jnp.zeros(view.out_shape, dtype))
                      if spec.use_bias else None)
    self.dropout = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def replaces_base_kernel(self) -> bool:
    return lora_init.is_weight_aware(self.spec.init)

  def adapter_input(self, x: Array) -> Array:
    return self.dropout(x) if self.dropout is not None else x

  def low_rank_output(self, x: Array, **kwargs) -> Array:
    """``s * (x A) B`` in the base output layout (x already dropped out)."""
    z = self.view.project_in(self.base, x, self.lora_a[...], **kwargs)
    # Scaling the rank-r activations instead of the output saves a full-size pass.
    return self.view.project_out(self.scale * z, self.lora_b[...])

  def adapter_bias(self, ndim: int) -> Array | None:
    if self.lora_bias is None:
      return None
    return self.view.broadcast_out(self.lora_bias[...].reshape(-1), ndim)

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.base(x, **kwargs)
    y = y + self.low_rank_output(self.adapter_input(x), **kwargs).astype(y.dtype)
    bias = self.adapter_bias(y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def delta_matrix(self) -> Array:
    return lora_delta(self.lora_a[...], self.lora_b[...], self.scale)

  def merge(self) -> nnx.Module:
    merged = super().merge()
    if self.lora_bias is not None:
      bias = self.lora_bias[...].reshape(self.view.out_shape)
      if merged.bias is None:
        merged.bias = nnx.Param(bias.astype(merged.kernel.dtype))
        merged.use_bias = True
      else:
        merged.bias[...] = (merged.bias[...] + bias.reshape(merged.bias.shape)).astype(merged.bias.dtype)
    return merged

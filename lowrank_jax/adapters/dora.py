"""DoRA: weight-decomposed low-rank adaptation.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024):

    W' = m * (W0 + s A B) / ||W0 + s A B||_c

where ``||.||_c`` is the norm of each output column of the (fan_in, fan_out)
matrix (PEFT's per-row norm of the (out, in) weight), ``m`` (fan_out,) is
trainable and initialized to ``||W0||_c``, and B = 0 at init (or any LoRA init:
with a weight-aware one ``W0 + s A B`` is the original weight, so the layer
still starts at the original function). As the paper recommends (Sec. 4.3),
the norm is treated as a constant in the backward pass (``detach_norm=True``);
``detach_norm=False`` keeps its gradient.

The forward pass is PEFT's: with g = m / ||W0 + s A B||_c and x_d the dropped
out input, ``y = base(x) + (g - 1) * (x_d W0) + g * s (x_d A) B``, which is
``g * (x W0 + s (x A) B) + bias`` without dropout. The column norm is
computed from the factors with no dense (fan_in, fan_out) temporary (on a
plain nnx.Linear layer without dropout, or with ``implementation`` set, the
forward is `lowrank_jax.kernels.lora_matmul` scaled by g and the norm is
`lowrank_jax.kernels.dora_norm`):

    ||W0_j + s (AB)_j||^2 = ||W0_j||^2 + 2 s (A^T W0)_j . B_j + s^2 B_j^T (A^T A) B_j
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.adapters import lora
from lowrank_jax.kernels import dora_norm as norm_kernel

Array = jax.Array


def dora_column_norm(w0: Array, a: Array, b: Array, scale: float) -> Array:
  """``||W0 + s A B||`` per output column (fan_out,), without forming ``A B``."""
  w0 = w0.astype(jnp.float32)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  base_sq = jnp.sum(w0 * w0, axis=0)
  cross = jnp.sum((a.T @ w0) * b, axis=0)
  low_rank_sq = jnp.sum(b * ((a.T @ a) @ b), axis=0)
  squared = base_sq + 2.0 * scale * cross + scale * scale * low_rank_sq
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def dora_effective_matrix(w0: Array, a: Array, b: Array, scale: float, magnitude: Array) -> Array:
  """The merged DoRA weight ``m * (W0 + s A B) / ||W0 + s A B||_c``, float32."""
  direction = w0.astype(jnp.float32) + lora.lora_delta(a, b, scale)
  norm = jnp.linalg.norm(direction, axis=0)
  return direction * (magnitude.astype(jnp.float32) / norm)[None, :]


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class DoRASpec(lora.LoRASpec):
  """DoRA hyperparameters: every LoRA option plus ``detach_norm``."""

  name = "dora"
  detach_norm: bool = True

  def validate(self, view: layers.LayerView, path: str) -> None:
    super().validate(view, path)
    if self.use_bias:
      raise ValueError(f"dora at '{path}': use_bias is not supported with DoRA.")

  @property
  def adapter_type(self) -> type["DoRA"]:
    return DoRA

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return super().num_params(fan_in, fan_out) + fan_out


class DoRA(lora.LoRA):
  """A DoRA adapter: LoRA leaves plus the trainable ``magnitude`` (fan_out,)."""

  additive = False

  def __init__(self, base: nnx.Module, spec: DoRASpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs, grad: Array | None = None):
    super().__init__(base, spec, view, path, rngs=rngs, grad=grad)
    norm = self.column_norm()
    sharding = adapter_base.sharding_for_factors(base, view)
    self.magnitude = adapter_base.AdapterParam(norm.astype(self.lora_a.dtype), **sharding["out"])

  def column_norm(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...])
    if self.uses_kernel:
      return norm_kernel.dora_norm(w0, self.lora_a[...], self.lora_b[...], self.scale,
                                   implementation=self.kernel_implementation,
                                   interpret=self.spec.interpret)
    return dora_column_norm(w0, self.lora_a[...], self.lora_b[...], self.scale)

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    norm = self.column_norm()
    if self.spec.detach_norm:
      norm = jax.lax.stop_gradient(norm)
    gain = self.magnitude[...].astype(jnp.float32) / norm
    if self.uses_kernel:
      if kwargs:
        raise TypeError(f"dora at '{self.path}': the fused kernel takes no call arguments; "
                        f"got {sorted(kwargs)}.")
      fused = self.fused_output(x)
      y = self.view.broadcast_out(gain, fused.ndim) * fused.astype(jnp.float32)
      bias = self.view.bias(self.base, y.ndim)
      return (y if bias is None else y + bias).astype(fused.dtype)
    x_adapter = self.adapter_input(x)
    low_rank = self.low_rank_output(x_adapter, **kwargs)
    if x_adapter is x:
      y_base = self.view.call_without_bias(self.base, x, **kwargs)
      gain = self.view.broadcast_out(gain, y_base.ndim)
      y = gain * (y_base.astype(jnp.float32) + low_rank.astype(jnp.float32))
      bias = self.view.bias(self.base, y.ndim)
      y = y if bias is None else y + bias
      return y.astype(y_base.dtype)
    y = self.base(x, **kwargs)
    gain = self.view.broadcast_out(gain, y.ndim)
    y_dropped = self.view.call_without_bias(self.base, x_adapter, **kwargs)
    return (y + (gain - 1.0) * y_dropped + gain * low_rank).astype(y.dtype)

  def effective_matrix(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...])
    return dora_effective_matrix(w0, self.lora_a[...], self.lora_b[...], self.scale,
                                 self.magnitude[...])

  def delta_matrix(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    return self.effective_matrix() - w0

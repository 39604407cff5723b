"""Weight normalization.

Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
Accelerate Training of Deep Neural Networks" (2016): every output neuron's
weight vector is

    w_j = g_j v_j / ||v_j||,

with v (fan_in, fan_out) and g (fan_out,) trainable, initialized to v = W0 and
g = ||W0||_c (column norms), so the layer starts as the base layer. The base
kernel is zeroed (the weight is replaced by (g, v)). The forward never forms
w: ``y = (x v) * g / ||v||_c + b`` through the base layer's own contraction.
Unlike DoRA there is no frozen W0 and no low-rank update: v is dense.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers

Array = jax.Array


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class WeightNormSpec(adapter_base.AdapterSpec):
  """Weight normalization (no hyperparameters besides eps).

  Attributes:
    eps: added to ||v_j|| in the denominator, >= 0.
  """

  name = "weight_norm"
  eps: float = 0.0

  def __post_init__(self):
    if not self.eps >= 0:
      raise ValueError(f"weight_norm: eps must be >= 0, got {self.eps!r}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del rngs, calibration
    return WeightNorm(base, self, layers.view_of(base, path), path)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


class WeightNorm(adapter_base.Adapter):
  """Leaves: ``direction`` v (base kernel layout) and ``gain`` g (fan_out,), trainable."""

  identity_at_init = True
  additive = True

  def __init__(self, base: nnx.Module, spec: WeightNormSpec, view: layers.LayerView,
               path: str = ""):
    super().__init__(base, spec, view, path)
    kernel = base.kernel[...]
    self.direction = adapter_base.AdapterParam(kernel)
    self.gain = adapter_base.AdapterParam(
        linalg.column_norms(view.to_matrix(kernel)).astype(kernel.dtype))
    base.kernel[...] = jnp.zeros_like(kernel)

  def column_scale(self) -> Array:
    """g / (||v||_c + eps), (fan_out,) float32."""
    norms = linalg.column_norms(self.view.to_matrix(self.direction[...]))
    return self.gain[...].astype(jnp.float32) / (norms + self.spec.eps)

  def delta_matrix(self) -> Array:
    v = self.view.to_matrix(self.direction[...]).astype(jnp.float32)
    return v * self.column_scale()[None, :]

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.view.call_without_bias(self.base, x, kernel=self.direction[...], **kwargs)
    scale = self.view.broadcast_out(self.column_scale(), y.ndim)
    y = (y.astype(jnp.float32) * scale).astype(y.dtype)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

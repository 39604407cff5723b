"""SST: sparse spectral training.

Zhao, Zhang, Chen, et al., "Sparse Spectral Training and Inference on
Euclidean and Hyperbolic Neural Networks" (2024). The weight is kept in SVD
form, in the (fan_in, fan_out) layout

    W = U diag(s) V^T,   U (fan_in, k), s (k,), V^T (k, fan_out), k = min(fan_in, fan_out),

initialized by the exact SVD of the base layer's init (the layer starts as the
base layer; the base kernel is then zeroed: the weight is replaced). Every
step updates all of s, but only the ``rank`` singular vectors of the current
round: U and V^T receive gradient on the sampled columns / rows only (a
gradient mask; the value is unchanged). Every T steps (`SSTResample`) the
weight is re-decomposed by SVD (restoring orthogonality of U and V), a new set
of ``rank`` indices is sampled without replacement with probability
proportional to s, and the optimizer moments of U, s and V^T are zeroed (so
Adam does not move vectors outside the new round by stale momentum).

Differences from the paper: the paper re-SVDs less often than it resamples
and keeps the moments of s; here both happen at every round, which is simpler
and keeps the stated invariants (function unchanged at the event).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.reparam import events

Array = jax.Array


def sample_round(key: Array, s: Array, rank: int) -> Array:
  """A (k,) 0/1 float mask of ``rank`` indices drawn without replacement, P(i) ∝ s_i."""
  s = jnp.maximum(s.astype(jnp.float32), 0.0)
  p = jnp.where(jnp.sum(s) > 0, s / jnp.sum(s), jnp.full_like(s, 1.0 / s.shape[0]))
  picks = jax.random.choice(key, s.shape[0], (rank,), replace=False, p=p)
  return jnp.zeros(s.shape, jnp.float32).at[picks].set(1.0)


def masked(value: Array, mask: Array) -> Array:
  """``value`` with its gradient multiplied by ``mask`` (broadcast)."""
  frozen = jax.lax.stop_gradient(value)
  return frozen + mask * (value - frozen)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SSTSpec(adapter_base.AdapterSpec):
  """SST hyperparameters.

  Attributes:
    rank: number of singular vectors trained per round, 1 <= rank <= min(fan_in, fan_out).
  """

  name = "sst"
  rank: int = 4

  def __post_init__(self):
    layers.check_positive_int("sst", "rank", self.rank)

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    layers.check_rank_fits_layer("sst", path, self.rank, view)
    return SST(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    k = min(fan_in, fan_out)
    return k * (fan_in + fan_out + 1)


class SST(adapter_base.Adapter):
  """``W = U diag(s) V^T`` with a per-round gradient mask on U and V^T.

  Leaves: ``u`` (fan_in, k), ``s`` (k,), ``vt`` (k, fan_out) trainable;
  ``round_mask`` (k,) frozen (1 on the singular vectors of the current round).
  """

  identity_at_init = True
  additive = True
  constrained_update = True  # U and V^T move only on the round's singular vectors

  def __init__(self, base: nnx.Module, spec: SSTSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(w0, full_matrices=False)
    dtype = base.kernel.dtype
    base.kernel[...] = jnp.zeros_like(base.kernel[...])
    self.u = adapter_base.AdapterParam(u.astype(dtype))
    self.s = adapter_base.AdapterParam(s.astype(dtype))
    self.vt = adapter_base.AdapterParam(vt.astype(dtype))
    self.round_mask = adapter_base.AdapterBuffer(
        sample_round(rngs.params(), s, spec.rank).astype(dtype))  # 0/1, exact in any float dtype

  def delta_matrix(self) -> Array:
    mask = self.round_mask[...].astype(jnp.float32)
    u = masked(self.u[...].astype(jnp.float32), mask[None, :])
    vt = masked(self.vt[...].astype(jnp.float32), mask[:, None])
    return (u * self.s[...].astype(jnp.float32)[None, :]) @ vt

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.view.call_without_bias(self.base, x, kernel=self.effective_kernel(), **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def resample(self, key: Array) -> None:
    """Re-decompose ``W`` by SVD and sample the next round (the function is unchanged)."""
    u, s, vt = jnp.linalg.svd(self.delta_matrix(), full_matrices=False)
    self.u[...] = u.astype(self.u.dtype)
    self.s[...] = s.astype(self.s.dtype)
    self.vt[...] = vt.astype(self.vt.dtype)
    self.round_mask[...] = sample_round(key, s, self.spec.rank).astype(self.round_mask.dtype)


@events.register("sst_resample")
@dataclasses.dataclass(frozen=True)
class SSTResample(events.Periodic):
  """Every ``every`` steps: re-SVD every SST layer, sample its next round, zero its moments."""

  seed: int = 0

  def __call__(self, model, opt_state, step):
    key = self.step_key(self.seed, step)
    for i, (path, layer) in enumerate(events.modules_of_type(model, SST)):
      layer.resample(jax.random.fold_in(key, i))
      for leaf in ("u", "s", "vt"):
        opt_state = events.zero_param_state(opt_state, path + (leaf,), getattr(layer, leaf).shape)
    return model, opt_state

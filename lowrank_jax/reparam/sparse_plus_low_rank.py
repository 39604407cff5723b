"""Sparse plus low-rank weights for pretraining: SLTrain and LOST.

Both replace the dense weight by ``W = s A B + S`` in the (fan_in, fan_out)
layout, A (fan_in, r) and B (r, fan_out) trainable, S sparse with a fixed
support whose values are trainable. The base kernel is zeroed at build (the
weight is replaced, not adapted), so ``W = W0 + delta`` with ``W0 = 0`` and
merging writes the factored weight into the base layer.

* SLTrain: Han, Li, Mishra, Jawanpuria et al., "SLTrain: a sparse plus
  low-rank approach for parameter and memory efficient pretraining" (2024).
  Initialization as in the official code (github.com/andyjm3/SLTrain,
  splora/splora_linear.py): the support is ``floor(sparsity * fan_in *
  fan_out)`` entries drawn uniformly without replacement, fixed for the whole
  run, with values ~ U(+-1/sqrt(fan_in)); A ~ U(+-1/sqrt(fan_in)) (PyTorch's
  kaiming-uniform with a = sqrt(5) on the (r, fan_in) factor) and B = 0, so the
  weight starts as S alone. Differences: at least one support entry is kept
  when the floor is 0; the bias stays the base layer's (frozen) bias, the
  official layer trains a bias drawn from U(+-1/sqrt(fan_out)).
* LOST: Li, Yin, Shen et al., "LOST: Low-rank and Sparse Pre-training for
  Large Language Models" (2025). From the base layer's (random) init W: ``s A
  B`` is its top-r SVD part (``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s)
  V_r^T``) and S is the complement ``W_comp = W - U_r S_r V_r^T`` restricted to
  the ``round(sparsity * fan_in)`` input channels (rows here; columns of the
  paper's (out, in) weight, the paper's ``x[:, I] W_s^T``) where ``W_comp`` has
  the largest L2 norm; the other channels of the complement are dropped. The
  rule is the paper's as described in its public reviews; its official code
  was not available to check. Not implemented: the paper's weighting
  ``gamma`` between the low-rank and the sparse outputs and its nonlinearity
  in the low-rank path (both are outside the linear ``W = s A B + S`` form).

The forward forms the (fan_in, fan_out) kernel ``s A B + S`` and runs the base
layer's contraction once (as SLTrain's reference implementation does); the
support is a flat index buffer into the matrix, so one mechanism serves both
element-sparse (SLTrain) and channel-sparse (LOST) supports.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers

Array = jax.Array


def scatter_support(values: Array, support: Array, shape: tuple[int, int]) -> Array:
  """The dense (fan_in, fan_out) matrix with ``values`` at flat indices ``support``."""
  flat = jnp.zeros(shape[0] * shape[1], jnp.float32).at[support].set(values.astype(jnp.float32))
  return flat.reshape(shape)


def _check_sparsity(name: str, sparsity: float) -> None:
  if not 0.0 < sparsity < 1.0:
    raise ValueError(f"{name}: sparsity must be in the open interval (0, 1), got {sparsity!r}.")


def _check_rank(name: str, rank: int) -> None:
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}.")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SLTrainSpec(adapter_base.AdapterSpec):
  """SLTrain hyperparameters.

  Attributes:
    rank: r >= 1 of the low-rank part (must be <= min(fan_in, fan_out)).
    alpha: the low-rank part is scaled by alpha / r; None means alpha = r.
    sparsity: share of the entries in the random support, in (0, 1).
  """

  name = "sltrain"
  rank: int = 4
  alpha: float | None = None
  sparsity: float = 0.03

  def __post_init__(self):
    _check_rank(self.name, self.rank)
    _check_sparsity(self.name, self.sparsity)

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def nnz(self, fan_in: int, fan_out: int) -> int:
    return max(1, math.floor(self.sparsity * fan_in * fan_out))

  def initial_factors(self, key: Array, w0: Array):
    """(A, B, values, support) at init (float32, int32) for the base weight w0 (fan_in, fan_out)."""
    fan_in, fan_out = w0.shape
    k_a, k_s, k_v = jax.random.split(key, 3)
    a = jax.random.uniform(k_a, (fan_in, self.rank), jnp.float32, -1.0, 1.0) / math.sqrt(fan_in)
    b = jnp.zeros((self.rank, fan_out), jnp.float32)
    nnz = self.nnz(fan_in, fan_out)
    support = jnp.sort(jax.random.choice(k_s, fan_in * fan_out, (nnz,), replace=False))
    values = jax.random.uniform(k_v, (nnz,), jnp.float32, -1.0, 1.0) / math.sqrt(fan_in)
    return a, b, values, support.astype(jnp.int32)

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    layers.check_rank_fits_layer(self.name, path, self.rank, view)
    return SparsePlusLowRank(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out) + self.nnz(fan_in, fan_out)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LOSTSpec(SLTrainSpec):
  """LOST hyperparameters: rank, alpha, and ``sparsity``, the share of input channels kept
  from the complement of the top-r SVD part, in (0, 1)."""

  name = "lost"
  sparsity: float = 0.25

  def channels(self, fan_in: int) -> int:
    return max(1, round(self.sparsity * fan_in))

  def nnz(self, fan_in: int, fan_out: int) -> int:
    return self.channels(fan_in) * fan_out

  def initial_factors(self, key: Array, w0: Array):
    del key
    fan_in, fan_out = w0.shape
    u, s, vt = jnp.linalg.svd(w0.astype(jnp.float32), full_matrices=False)
    r = self.rank
    root = jnp.sqrt(s[:r] / self.scale)
    a, b = u[:, :r] * root[None, :], root[:, None] * vt[:r]
    complement = w0 - (u[:, :r] * s[:r]) @ vt[:r]
    keep = jnp.sort(jnp.argsort(-linalg.column_norms(complement.T))[: self.channels(fan_in)])
    support = (keep[:, None] * fan_out + jnp.arange(fan_out)[None, :]).reshape(-1)
    return a, b, complement[keep].reshape(-1), support.astype(jnp.int32)


class SparsePlusLowRank(adapter_base.Adapter):
  """``W = s A B + S`` with the base kernel zeroed (see the module docstring).

  Leaves: ``lora_a`` (fan_in, r), ``lora_b`` (r, fan_out), ``sparse_values``
  (nnz,) trainable; ``sparse_support`` (nnz,) int32 flat indices, frozen.
  """

  identity_at_init = False
  additive = True

  def __init__(self, base: nnx.Module, spec: SLTrainSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    a, b, values, support = spec.initial_factors(rngs.params(), w0)
    dtype = base.kernel.dtype
    base.kernel[...] = jnp.zeros_like(base.kernel[...])
    self.lora_a = adapter_base.AdapterParam(a.astype(dtype))
    self.lora_b = adapter_base.AdapterParam(b.astype(dtype))
    self.sparse_values = adapter_base.AdapterParam(values.astype(dtype))
    self.sparse_support = adapter_base.AdapterBuffer(support)

  def sparse_matrix(self) -> Array:
    """S as a dense (fan_in, fan_out) float32 matrix."""
    return scatter_support(self.sparse_values[...], self.sparse_support[...],
                           (self.view.fan_in, self.view.fan_out))

  def delta_matrix(self) -> Array:
    low_rank = self.spec.scale * (self.lora_a[...].astype(jnp.float32)
                                  @ self.lora_b[...].astype(jnp.float32))
    return low_rank + self.sparse_matrix()

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.view.call_without_bias(self.base, x, kernel=self.effective_kernel(), **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

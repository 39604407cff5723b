"""Sparse plus low-rank weights for pretraining: SLTrain and LOST.

Both replace the dense layer by a low-rank and a sparse branch in the
(fan_in, fan_out) layout, A (fan_in, r) and B (r, fan_out) trainable, S sparse
with a fixed support whose values are trainable:

    y = c_L sigma(x A) B + c_S x S + b,

``sigma`` the identity unless set, so the weight is ``W = c_L A B + c_S S``.
The base kernel is zeroed at build (the weight is replaced, not adapted), so
``W = W0 + delta`` with ``W0 = 0`` and merging writes the factored weight into
the base layer. The bias stays the base layer's (frozen) bias.

* SLTrain: Han, Li, Mishra, Jawanpuria et al., "SLTrain: a sparse plus
  low-rank approach for parameter and memory efficient pretraining" (2024),
  ``c_L = s = alpha / r``, ``c_S = 1``, sigma = identity. Initialization as in
  the official code (github.com/andyjm3/SLTrain, splora/splora_linear.py): the
  support is ``floor(sparsity * fan_in * fan_out)`` entries drawn uniformly
  without replacement, fixed for the whole run, with values ~
  U(+-1/sqrt(fan_in)); A ~ U(+-1/sqrt(fan_in)) (PyTorch's kaiming-uniform with
  a = sqrt(5) on the (r, fan_in) factor) and B = 0, so the weight starts as S
  alone. Differences: at least one support entry is kept when the floor is 0;
  the official layer trains a bias drawn from U(+-1/sqrt(fan_out)).
* LOST: Li, Yin, Shen et al., "LOST: Low-rank and Sparse Pre-training for
  Large Language Models" (2025, arXiv:2508.02668),
  ``c_L = s gamma``, ``c_S = s (1 - gamma)``, the paper's weighting of the
  low-rank and the sparse outputs, and an optional ``activation`` sigma
  between A and B (CoLA-style; 'silu' in the authors' code). S is supported
  on the ``max(1, floor(sparsity * fan_in))`` input channels (rows here;
  columns of the (out, in) weight, used as ``x[:, I] W_s^T``) where the
  complement ``W_comp = W - U_r S_r V_r^T`` of the base layer's (random) init
  W has the largest L2 norm, and holds ``W_comp`` there; the other channels of
  the complement are dropped. A, B are the top-r SVD part:
  ``A = U_r sqrt(S_r / c_L)``, ``B = sqrt(S_r / c_L) V_r^T``, and the values
  are ``W_comp[I] / c_S``, so with sigma = identity the layer starts at
  ``U_r S_r V_r^T + W_comp`` on the kept channels whatever gamma and alpha.
  Sources: the official repository (linked from the paper,
  github.com/JiaxiLi1/LOST-Low-rank-and-Sparse-Training-for-Large-Language-Models)
  was not available to us, nor the paper's method section; the output form
  ``s (gamma sigma(x A) B + (1 - gamma) x[:, I] W_s^T)``, the default gamma
  0.5, SiLU as sigma, the floor channel count and the top-k input-channel
  norms of an SVD complement are those of the first author's public low-rank
  plus sparse adapter (github.com/JiaxiLi1/elsa_finetuning,
  ``hybrid_lowrank_sparse_adapter.py``, ``HybridSparseAdapter``; the same file
  is in github.com/JiaxiLi1/Lora-init), and the complement rule is the paper's
  as described in its public reviews (OpenReview, ICLR 2026 submission 14240).
  Differences from that adapter, which fine-tunes on top of a frozen W: it
  does not divide the SVD factors by ``c_L`` (ours keep the init weight
  independent of gamma and alpha), its sparse values start from W itself on
  the kept channels (ours from ``W_comp``, the pretraining rule of the
  reviews), and it may score the channels on the next k singular components
  only (``sparse_svd_rank``); ours scores the whole complement.

With sigma = identity the forward forms the (fan_in, fan_out) kernel ``c_L A
B + c_S S`` and runs the base layer's contraction once (as SLTrain's
reference implementation does). With a nonlinear sigma the low-rank branch
runs as ``sigma(x A) B`` through the base layer's contraction and the sparse
kernel ``c_S S`` as a second contraction; no kernel holds that layer, so it is
not mergeable (`merge`, `delta` and `effective_kernel` raise) and does not
start at the base init. The support is a flat index buffer into the matrix,
so one mechanism serves both element-sparse (SLTrain) and channel-sparse
(LOST) supports.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import bottleneck
from lowrank_jax.adapters import layers

Array = jax.Array


def scatter_support(values: Array, support: Array, shape: tuple[int, int]) -> Array:
  """The dense (fan_in, fan_out) matrix with ``values`` at flat indices ``support``."""
  flat = jnp.zeros(shape[0] * shape[1], jnp.float32).at[support].set(values.astype(jnp.float32))
  return flat.reshape(shape)


def _check_sparsity(name: str, sparsity: float) -> None:
  if not 0.0 < sparsity < 1.0:
    raise ValueError(f"{name}: sparsity must be in the open interval (0, 1), got {sparsity!r}.")



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
    layers.check_positive_int(self.name, "rank", self.rank)
    _check_sparsity(self.name, self.sparsity)

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  @property
  def branch_scales(self) -> tuple[float, float]:
    """(c_L, c_S): the multipliers of the low-rank and the sparse branch."""
    return self.scale, 1.0

  @property
  def nonlinear(self) -> bool:
    """Whether an activation sits between A and B (then the layer has no kernel)."""
    return False

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
    adapter_type = NonlinearSparsePlusLowRank if self.nonlinear else SparsePlusLowRank
    return adapter_type(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out) + self.nnz(fan_in, fan_out)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LOSTSpec(SLTrainSpec):
  """LOST hyperparameters (see the module docstring).

  Attributes:
    rank: r >= 1 of the low-rank part (must be <= min(fan_in, fan_out)).
    alpha: both branches are scaled by s = alpha / r; None means alpha = r.
    sparsity: share of the input channels kept from the complement of the
      top-r SVD part, in (0, 1); ``max(1, floor(sparsity * fan_in))`` channels.
    gamma: weight of the low-rank output, in (0, 1); the sparse output gets
      ``1 - gamma``.
    activation: sigma between A and B: 'identity' (a linear, mergeable
      layer), or 'silu' (as the first author's adapter), 'gelu', 'relu', 'tanh'.
  """

  name = "lost"
  sparsity: float = 0.25
  gamma: float = 0.5
  activation: str = "identity"

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < self.gamma < 1.0:
      raise ValueError(f"{self.name}: gamma must be in the open interval (0, 1), got {self.gamma!r}.")
    if self.activation not in bottleneck.ACTIVATIONS:
      raise ValueError(f"{self.name}: activation must be one of {sorted(bottleneck.ACTIVATIONS)}, "
                       f"got {self.activation!r}.")

  @property
  def branch_scales(self) -> tuple[float, float]:
    return self.scale * self.gamma, self.scale * (1.0 - self.gamma)

  @property
  def nonlinear(self) -> bool:
    return self.activation != "identity"

  def channels(self, fan_in: int) -> int:
    return max(1, math.floor(self.sparsity * fan_in))

  def nnz(self, fan_in: int, fan_out: int) -> int:
    return self.channels(fan_in) * fan_out

  def initial_factors(self, key: Array, w0: Array):
    del key
    fan_in, fan_out = w0.shape
    u, s, vt = jnp.linalg.svd(w0.astype(jnp.float32), full_matrices=False)
    r = self.rank
    low_rank_scale, sparse_scale = self.branch_scales
    root = jnp.sqrt(s[:r] / low_rank_scale)
    a, b = u[:, :r] * root[None, :], root[:, None] * vt[:r]
    complement = w0 - (u[:, :r] * s[:r]) @ vt[:r]
    keep = jnp.sort(jnp.argsort(-linalg.column_norms(complement.T))[: self.channels(fan_in)])
    support = (keep[:, None] * fan_out + jnp.arange(fan_out)[None, :]).reshape(-1)
    return a, b, complement[keep].reshape(-1) / sparse_scale, support.astype(jnp.int32)


class SparsePlusLowRank(adapter_base.Adapter):
  """``W = c_L A B + c_S S`` with the base kernel zeroed (see the module docstring).

  Leaves: ``lora_a`` (fan_in, r), ``lora_b`` (r, fan_out), ``sparse_values``
  (nnz,) trainable; ``sparse_support`` (nnz,) int32 flat indices, frozen.
  """

  identity_at_init: ClassVar[bool] = False
  additive: ClassVar[bool] = True

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
    low_rank_scale, sparse_scale = self.spec.branch_scales
    low_rank = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)
    return low_rank_scale * low_rank + sparse_scale * self.sparse_matrix()

  def branches(self, x: Array, **kwargs) -> Array:
    """The output of both branches, without the bias."""
    return self.view.call_without_bias(self.base, x, kernel=self.effective_kernel(), **kwargs)

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.branches(x, **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)


class NonlinearSparsePlusLowRank(SparsePlusLowRank):
  """``y = c_L sigma(x A) B + c_S x S + b``: LOST with an activation; no kernel holds it."""

  additive: ClassVar[bool] = False
  mergeable: ClassVar[bool] = False

  def delta_matrix(self) -> Array:
    self.check_mergeable()

  def effective_matrix(self) -> Array:
    self.check_mergeable()

  def branches(self, x: Array, **kwargs) -> Array:
    low_rank_scale, sparse_scale = self.spec.branch_scales
    dtype = self.base.kernel.dtype
    sparse_kernel = self.view.from_matrix(sparse_scale * self.sparse_matrix()).astype(dtype)
    sparse = self.view.call_without_bias(self.base, x, kernel=sparse_kernel, **kwargs)
    z = self.view.project_in(self.base, x, self.lora_a[...], **kwargs)
    sigma = bottleneck.ACTIVATIONS[self.spec.activation]
    low_rank = self.view.project_out(low_rank_scale * sigma(z), self.lora_b[...])
    return sparse + low_rank.astype(sparse.dtype)

"""Orthogonal (multiplicative) adapters: OFT, BOFT, HRA.

Each method learns an orthogonal (fan_in, fan_in) matrix R acting on the
input side of the frozen weight, ``W = R W0`` in the (fan_in, fan_out) layout
of `LayerView` (``y = x R W0``: the input is rotated, as in PEFT, whose
(out, in) weight becomes ``W0 R^T``). These methods are multiplicative, so
the forward forms the effective kernel ``R W0`` (block by block, never the
dense R for OFT/BOFT) and runs the base layer's contraction with it plus the
base bias; `merge` writes that kernel. They are not additive (the update
depends on W0), so ``merge(keep_adapters=True)`` is refused.

Conv kernels are rotated on the flattened fan_in axis in our (window..., in)
order; PEFT orders it (in, window...), so block boundaries differ on Conv
layers (Linear layers match PEFT exactly).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.adapters import products

Array = jax.Array


class OrthogonalAdapter(adapter_base.Adapter):
  """``W = R W0`` (times a per-output scale for BOFT); subclasses implement `rotate`."""

  additive = False

  def rotate(self, w: Array) -> Array:
    """``R @ w`` for a (fan_in, n) matrix, in float32."""
    raise NotImplementedError

  def rotation(self) -> Array:
    """The (fan_in, fan_in) orthogonal matrix R."""
    return self.rotate(jnp.eye(self.view.fan_in, dtype=jnp.float32))

  def effective_matrix(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    return self.rotate(w0)

  def delta_matrix(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    return self.effective_matrix() - w0

  def adapter_forward(self, x, **kwargs):
    kernel = self.effective_kernel()
    y = self.view.call_without_bias(self.base, x, kernel=kernel, **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)


def cayley_blocks(q: Array, block_size: int, neumann_order: int) -> Array:
  """Orthogonal blocks (..., b, b) from packed skew entries (..., b(b-1)/2).

  ``R = (I - Q)^{-1} (I + Q)`` (`linalg.cayley`), or its Neumann-series
  approximation of that order (`linalg.cayley_neumann`) when > 0.
  """
  skew = linalg.skew_from_vector(q.astype(jnp.float32), block_size)
  if neumann_order > 0:
    return linalg.cayley_neumann(skew, neumann_order)
  return linalg.cayley(skew)


def apply_block_diagonal(blocks: Array, w: Array) -> Array:
  """``block_diag(blocks) @ w`` for blocks (k, b, b) and w (k b, n)."""
  k, b, _ = blocks.shape
  return jnp.einsum("kij,kjn->kin", blocks, w.reshape(k, b, -1)).reshape(k * b, -1)


def resolve_blocks(method: str, path: str, fan_in: int, block_size: int | None,
                   num_blocks: int | None, default_limit: int,
                   valid=lambda block_size: True) -> tuple[int, int]:
  """``(block_size, num_blocks)`` with ``block_size * num_blocks == fan_in``.

  With neither given, the largest block size <= default_limit that divides
  fan_in and passes ``valid``. A given size that does not divide fan_in is an
  error naming the layer.
  """
  where = f" at '{path}'" if path else ""
  if block_size is not None and num_blocks is not None:
    raise ValueError(f"{method}: give block_size or num_blocks, not both.")
  if block_size is None and num_blocks is None:
    sizes = [b for b in range(1, min(default_limit, fan_in) + 1) if fan_in % b == 0 and valid(b)]
    if not sizes:
      raise ValueError(f"{method}{where}: no block size <= {default_limit} fits fan_in={fan_in}; "
                       "set block_size or num_blocks.")
    block_size = max(sizes)
  elif block_size is None:
    if fan_in % num_blocks:
      raise ValueError(f"{method}{where}: num_blocks={num_blocks} does not divide fan_in={fan_in}.")
    block_size = fan_in // num_blocks
  elif fan_in % block_size:
    raise ValueError(f"{method}{where}: block_size={block_size} does not divide fan_in={fan_in}; "
                     f"the divisors of {fan_in} are "
                     f"{[d for d in range(1, fan_in + 1) if fan_in % d == 0]}.")
  return block_size, fan_in // block_size


def _check_neumann(method: str, order: Any) -> None:
  if not isinstance(order, int) or isinstance(order, bool) or order < 0:
    raise ValueError(f"{method}: cayley_neumann_order must be an integer >= 0 (0: exact Cayley), "
                     f"got {order!r}.")


# -- OFT ----------------------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class OFTSpec(adapter_base.AdapterSpec):
  """OFT (Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal
  Finetuning", 2023; PEFT's OFT v2 layout):

      W = R W0,   R = block_diag(R_1, ..., R_k),   R_i = cayley(Q_i) = (I - Q_i)^{-1} (I + Q_i)

  with Q_i skew-symmetric (b(b-1)/2 free entries each, zero at init, so R = I).
  The forward forms the effective kernel (multiplicative method).

  PEFT correspondence (nn.Linear, ``oft_R.weight`` (k, b(b-1)/2)): PEFT's
  Neumann branch (its default) computes ``I + 2Q + ... + 2Q^{T-2} + Q^{T-1}``
  = ``cayley_neumann(Q, T - 2)``, the same sign convention as ours, so
  ``q = oft_R.weight`` with ``cayley_neumann_order = num_cayley_neumann_terms
  - 2``; PEFT's exact branch computes ``(I - Q)(I + Q)^{-1} = cayley(-Q)``,
  so there ``q = -oft_R.weight``. Not implemented: COFT's norm constraint,
  multiplicative dropout.

  Attributes:
    block_size: b, must divide fan_in. None (with num_blocks None): the
      largest divisor of fan_in that is <= 32 (PEFT's default size 32).
    num_blocks: k = fan_in / b instead of block_size.
    block_share: one block shared by all k diagonal positions.
    cayley_neumann_order: 0 for the exact Cayley transform; > 0 for its
      Neumann series of that order (no inverse, orthogonal up to O(||Q||^{order+1})).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "oft"
  block_size: int | None = None
  num_blocks: int | None = None
  block_share: bool = False
  cayley_neumann_order: int = 0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "block_size", self.block_size, allow_none=True)
    layers.check_positive_int(self.name, "num_blocks", self.num_blocks, allow_none=True)
    _check_neumann(self.name, self.cayley_neumann_order)
    if self.block_size is not None and self.num_blocks is not None:
      raise ValueError(f"{self.name}: give block_size or num_blocks, not both.")

  def blocks(self, fan_in: int, path: str = "") -> tuple[int, int]:
    return resolve_blocks(self.name, path, fan_in, self.block_size, self.num_blocks, 32)

  def build(self, base, *, rngs, calibration=None, path=""):
    del rngs, calibration
    view = layers.view_of(base, path)
    return OFT(base, self, view, path, blocks=self.blocks(view.fan_in, path))

  def num_params(self, fan_in: int, fan_out: int) -> int:
    size, count = self.blocks(fan_in)
    return (1 if self.block_share else count) * linalg.skew_size(size)


class OFT(OrthogonalAdapter):
  """An OFT adapter (see `OFTSpec`). Leaf ``oft_q`` (k or 1, b(b-1)/2)."""

  def __init__(self, base, spec: OFTSpec, view, path="", *, blocks: tuple[int, int]):
    super().__init__(base, spec, view, path)
    self.block_size, self.num_blocks = blocks
    stored = 1 if spec.block_share else self.num_blocks
    self.oft_q = adapter_base.AdapterParam(
        jnp.zeros((stored, linalg.skew_size(self.block_size)), products.param_dtype(spec, base)))

  def blocks(self) -> Array:
    """The orthogonal diagonal blocks (k, b, b)."""
    r = cayley_blocks(self.oft_q[...], self.block_size, self.spec.cayley_neumann_order)
    return jnp.broadcast_to(r, (self.num_blocks,) + r.shape[1:])

  def rotate(self, w):
    return apply_block_diagonal(self.blocks(), w.astype(jnp.float32))


# -- BOFT ---------------------------------------------------------------------------
def butterfly_permutation(n: int, groups: int, half_block: int) -> np.ndarray:
  """Index permutation of one butterfly factor (PEFT's ``block_butterfly_perm``).

  The n indices are cut into ``groups`` equal groups; inside each group the
  chunks of ``half_block`` indices are reordered even chunks first, then odd
  ones. Permuting by it, applying a block-diagonal matrix and permuting back
  mixes index i with index i + (group size / 2): the butterfly pattern.
  """
  group = n // groups
  chunks = group // half_block
  order = np.concatenate([np.arange(0, chunks, 2), np.arange(1, chunks, 2)])
  inside = (order[:, None] * half_block + np.arange(half_block)[None, :]).reshape(-1)
  return (np.arange(0, n, group)[:, None] + inside[None, :]).reshape(-1)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class BOFTSpec(adapter_base.AdapterSpec):
  """BOFT (Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly
  Factorization", 2024; PEFT's BOFT):

      W = (B_{m-1} ... B_1 B_0 W0) diag(s),   B_i = P_i block_diag(R_{i,1..k}) P_i^T

  with R_{i,j} = cayley(Q_{i,j}) (b x b, zero skew entries at init), P_i the
  butterfly permutations (`butterfly_permutation`, P_0 = I) and ``s``
  (fan_out,) a trainable output scale initialized to 1. m = 1 is OFT with a
  scale. The forward forms the effective kernel (multiplicative method).

  PEFT correspondence (nn.Linear): PEFT stores full (b, b) matrices
  ``boft_R`` (m, k, b, b) and uses their skew part S = (R - R^T)/2 with
  ``(I - S)(I + S)^{-1} = cayley(-S)``, so ``q = -skew_to_vector(S)`` (half
  the parameters); ``boft_s`` (out, 1) = s. PEFT without its CUDA extension
  silently uses m = 1; the parity test supplies a block-diagonal stand-in
  for the extension to check m > 1. Not implemented: multiplicative dropout.

  Attributes:
    butterfly_factors: m >= 1 (PEFT's ``boft_n_butterfly_factor``). With m > 1,
      b must be even and k a multiple of 2^(m-1).
    block_size: b, must divide fan_in. None (with num_blocks None): the largest
      valid b <= 8.
    num_blocks: k = fan_in / b instead of block_size.
    cayley_neumann_order: 0 exact Cayley; > 0 its Neumann series (see OFT).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "boft"
  butterfly_factors: int = 2
  block_size: int | None = None
  num_blocks: int | None = None
  cayley_neumann_order: int = 0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "butterfly_factors", self.butterfly_factors)
    layers.check_positive_int(self.name, "block_size", self.block_size, allow_none=True)
    layers.check_positive_int(self.name, "num_blocks", self.num_blocks, allow_none=True)
    _check_neumann(self.name, self.cayley_neumann_order)
    if self.block_size is not None and self.num_blocks is not None:
      raise ValueError(f"{self.name}: give block_size or num_blocks, not both.")

  def _butterfly_ok(self, fan_in: int, block_size: int) -> bool:
    if self.butterfly_factors == 1:
      return True
    return block_size % 2 == 0 and (fan_in // block_size) % 2 ** (self.butterfly_factors - 1) == 0

  def blocks(self, fan_in: int, path: str = "") -> tuple[int, int]:
    size, count = resolve_blocks(self.name, path, fan_in, self.block_size, self.num_blocks, 8,
                                 valid=lambda b: self._butterfly_ok(fan_in, b))
    if not self._butterfly_ok(fan_in, size):
      where = f" at '{path}'" if path else ""
      raise ValueError(
          f"boft{where}: butterfly_factors={self.butterfly_factors} needs an even block_size and "
          f"num_blocks a multiple of 2^{self.butterfly_factors - 1}; got block_size={size}, "
          f"num_blocks={count} for fan_in={fan_in}.")
    return size, count

  def build(self, base, *, rngs, calibration=None, path=""):
    del rngs, calibration
    view = layers.view_of(base, path)
    return BOFT(base, self, view, path, blocks=self.blocks(view.fan_in, path))

  def num_params(self, fan_in: int, fan_out: int) -> int:
    size, count = self.blocks(fan_in)
    return self.butterfly_factors * count * linalg.skew_size(size) + fan_out


class BOFT(OrthogonalAdapter):
  """A BOFT adapter (see `BOFTSpec`). Leaves ``boft_q`` (m, k, b(b-1)/2) and
  ``boft_scale`` (fan_out,)."""

  def __init__(self, base, spec: BOFTSpec, view, path="", *, blocks: tuple[int, int]):
    super().__init__(base, spec, view, path)
    self.block_size, self.num_blocks = blocks
    dtype = products.param_dtype(spec, base)
    m = spec.butterfly_factors
    self.boft_q = adapter_base.AdapterParam(
        jnp.zeros((m, self.num_blocks, linalg.skew_size(self.block_size)), dtype))
    sharding = adapter_base.sharding_for_factors(base, view)
    self.boft_scale = adapter_base.AdapterParam(jnp.ones((view.fan_out,), dtype), **sharding["out"])
    # Static index tuples; P_0 = I.
    self.permutations = tuple(
        tuple(int(j) for j in butterfly_permutation(view.fan_in, self.num_blocks // 2 ** i,
                                                    self.block_size // 2))
        if i else tuple(range(view.fan_in)) for i in range(m))

  def rotate(self, w):
    """The butterfly product ``B_{m-1} ... B_0 w`` (the scale is not included)."""
    blocks = cayley_blocks(self.boft_q[...], self.block_size, self.spec.cayley_neumann_order)
    w = w.astype(jnp.float32)
    for factor, perm in zip(blocks, self.permutations):
      perm = np.asarray(perm)
      inverse = np.argsort(perm)
      w = apply_block_diagonal(factor, w[inverse])[perm]  # P D P^T w
    return w

  def effective_matrix(self):
    return super().effective_matrix() * self.boft_scale[...].astype(jnp.float32)[None, :]


# -- HRA ----------------------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class HRASpec(adapter_base.AdapterSpec):
  """HRA (Yuan et al., "Bridging The Gap between Low-rank and Orthogonal
  Adaptation via Householder Reflection Adaptation", 2024; PEFT's HRA):

      PEFT (out, in):  W = W0 H,   H = H_1 H_2 ... H_r,   H_i = I - 2 u_i u_i^T / ||u_i||^2
      ours (in, out):  W = H^T W0 = H_r ... H_1 W0

  r Householder reflections of the input space, r * fan_in parameters. Init
  as PEFT: the u come in identical pairs (u_{2i} = u_{2i+1} ~ U(+-1/sqrt(r/2)),
  torch's kaiming fan of the (fan_in, r/2) half), so each pair cancels and the
  layer starts at W0; r must therefore be even. The regularizer of the paper,
  ``||I - U^T U||_F^2`` with U the column-normalized [u_1..u_r], is
  `hra_penalty` (a function of the model that a loss scales by lambda and
  adds). The forward forms the effective kernel (multiplicative method).

  PEFT correspondence: ``hra_u`` (in, r) = ``u``. Not implemented: PEFT's
  ``apply_GS`` (Gram-Schmidt orthogonalized reflections), whose layer does
  not start at W0.

  Attributes:
    rank: r, the number of reflections (even).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "hra"
  rank: int = 8
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if self.rank % 2:
      raise ValueError(f"{self.name}: rank must be even (the reflections start in identical pairs "
                       f"so that the product is I), got {self.rank}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    return HRA(base, self, layers.view_of(base, path), path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * fan_in


class HRA(OrthogonalAdapter):
  """An HRA adapter (see `HRASpec`). Leaf ``hra_u`` (fan_in, r)."""

  def __init__(self, base, spec: HRASpec, view, path="", *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    half = spec.rank // 2
    u = products.uniform_fan_in(rngs.params(), (view.fan_in, half), half)
    sharding = adapter_base.sharding_for_factors(base, view)
    self.hra_u = adapter_base.AdapterParam(
        jnp.repeat(u, 2, axis=1).astype(products.param_dtype(spec, base)), **sharding["a"])

  def unit_vectors(self) -> Array:
    u = self.hra_u[...].astype(jnp.float32)
    return u / jnp.linalg.norm(u, axis=0, keepdims=True)

  def rotate(self, w):
    # H^T w = H_r (... (H_1 w)): one rank-1 update per reflection.
    w = w.astype(jnp.float32)
    for u in self.unit_vectors().T:
      w = w - 2.0 * jnp.outer(u, u @ w)
    return w

  def penalty(self) -> Array:
    """``||I - U^T U||_F^2`` for the column-normalized reflection vectors U."""
    u = self.unit_vectors()
    gram = u.T @ u
    return jnp.sum((jnp.eye(gram.shape[0], dtype=gram.dtype) - gram) ** 2)


def hra_penalty(model: nnx.Module) -> Array:
  """HRA's orthogonality regularizer summed over every HRA adapter in ``model``.

  ``sum_layers ||I - U^T U||_F^2``; add ``lambda * hra_penalty(model)`` to the
  loss (the paper's lambda, e.g. 1e-4 to 1e-3). Zero when the model has none.
  """
  terms = [node.penalty() for _, node in nnx.iter_graph(model) if isinstance(node, HRA)]
  return sum(terms, jnp.zeros((), jnp.float32))

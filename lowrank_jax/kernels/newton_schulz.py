"""Newton-Schulz orthogonalization with a fused, symmetry-aware step.

One step of the quintic iteration of Muon (Jordan et al., "Muon: An optimizer
for hidden layers in neural networks", 2024) on a wide X (m <= n):

    A = X X^T,    B = b A + c A A,    X <- a X + B X

with ``X_0 = x / (||x||_F + eps)``; the same iteration and coefficients as
`lowrank_jax.linalg.newton_schulz` (the reference), which also transposes a
tall input first.

Pallas: A and B are symmetric, so their kernel computes only the tiles on and
above the block diagonal (a grid over the upper-triangle tile pairs, whose
row/column tables are scalar-prefetched), nearly halving the flops of the two
Gram-type products; the lower tiles are the transposes of the upper ones,
filled in by one elementwise select. ``B = b A + c A A^T`` (A A = A A^T for a
symmetric A) fuses the ``b A`` term into the accumulator, and ``a X + B X``
fuses ``a X``. The XLA version computes the same three products densely.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lowrank_jax import linalg
from lowrank_jax.kernels import _common

Array = jax.Array
OP = "newton_schulz"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles: ``block_m`` the square tiles of A and B and the rows of X's update,
  ``block_n`` the columns of X's update, ``block_k`` every contraction.
  Multiples of 128, or larger than the axis (then the axis is taken whole).
  """

  block_m: int = 256
  block_n: int = 512
  block_k: int = 512


def reference(x: Array, *, steps: int = 5, coeffs="muon", eps: float = 1e-7) -> Array:
  """`lowrank_jax.linalg.newton_schulz` (float32)."""
  return linalg.newton_schulz(x, steps=steps, coeffs=coeffs, eps=eps)


# -- C = alpha * D + beta * L L^T, upper block triangle only ----------------------------

def _symmetric_kernel(rows_ref, cols_ref, lhs_ref, rhs_ref, *rest, alpha, beta, has_addend):
  del rows_ref, cols_ref
  addend_ref, out_ref, acc_ref = rest if has_addend else (None,) + tuple(rest)
  k = pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    if has_addend:
      acc_ref[...] = alpha * addend_ref[...].astype(jnp.float32)
    else:
      acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += beta * jax.lax.dot_general(
      lhs_ref[...], rhs_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(1) - 1)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _symmetric_pallas(lhs, addend, alpha, beta, block_sizes, interpret):
  m, depth = lhs.shape
  bt = _common.fit_block(m, block_sizes.block_m, 128, "block_m")
  bk = _common.fit_block(depth, block_sizes.block_k, 128, "block_k")
  padded = _common.pad_axis(lhs, 1, bk)
  tiles = pl.cdiv(m, bt)
  rows, cols = np.triu_indices(tiles)
  tile = lambda p, k, r, c: (r[p], c[p])
  in_specs = [pl.BlockSpec((bt, bk), lambda p, k, r, c: (r[p], k)),
              pl.BlockSpec((bt, bk), lambda p, k, r, c: (c[p], k))]
  operands = [padded, padded]
  if addend is not None:
    in_specs.append(pl.BlockSpec((bt, bt), tile))
    operands.append(addend)
  upper = pl.pallas_call(
      functools.partial(_symmetric_kernel, alpha=alpha, beta=beta, has_addend=addend is not None),
      out_shape=jax.ShapeDtypeStruct((m, m), lhs.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(len(rows), padded.shape[1] // bk), in_specs=in_specs,
          out_specs=pl.BlockSpec((bt, bt), tile),
          scratch_shapes=[pltpu.VMEM((bt, bt), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="newton_schulz_symmetric",
  )(jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), *operands)
  tile_index = jnp.arange(m) // bt
  in_upper = tile_index[None, :] >= tile_index[:, None]
  return jnp.where(in_upper, upper, upper.T)


# -- X' = a X + B X -----------------------------------------------------------------

def _update_kernel(b_ref, x_ref, addend_ref, out_ref, acc_ref, *, a):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = a * addend_ref[...].astype(jnp.float32)

  acc_ref[...] += jnp.dot(b_ref[...], x_ref[...], preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _update_pallas(b, x, a, block_sizes, interpret):
  m, n = x.shape
  bm = _common.fit_block(m, block_sizes.block_m, 128, "block_m")
  bn = _common.fit_block(n, block_sizes.block_n, 128, "block_n")
  bk = _common.fit_block(m, block_sizes.block_k, 128, "block_k")
  b_padded = _common.pad_axis(b, 1, bk)
  x_padded = _common.pad_axis(x, 0, bk)
  return pl.pallas_call(
      functools.partial(_update_kernel, a=a),
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), b_padded.shape[1] // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
                pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
                pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="newton_schulz_update",
  )(b_padded, x_padded, x)


def newton_schulz_step(x: Array, a: float, b: float, c: float, *,
                       implementation: str | None = None, block_sizes: BlockSizes | None = None,
                       interpret: bool = False) -> Array:
  """One step ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` on a wide (m <= n) X."""
  implementation = _common.resolve_implementation(OP, implementation, interpret)
  if implementation == "xla":
    f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    gram = f32(x, x.T).astype(x.dtype)
    poly = (b * gram.astype(jnp.float32) + c * f32(gram, gram)).astype(x.dtype)
    return (a * x.astype(jnp.float32) + f32(poly, x)).astype(x.dtype)
  block_sizes = block_sizes or BlockSizes()
  gram = _symmetric_pallas(x, None, 0.0, 1.0, block_sizes, interpret)
  poly = _symmetric_pallas(gram, gram, b, c, block_sizes, interpret)
  return _update_pallas(poly, x, a, block_sizes, interpret)


def newton_schulz(x: Array, *, steps: int = 5, coeffs="muon", eps: float = 1e-7,
                  implementation: str | None = None, block_sizes: BlockSizes | None = None,
                  interpret: bool = False) -> Array:
  """Approximate polar factor of ``x`` (m, n) by ``steps`` fused Newton-Schulz steps.

  Iterates in x's dtype (float32 or bfloat16) with float32 accumulation and
  returns that dtype; `lowrank_jax.linalg.newton_schulz` always works in
  float32. Raises on a non-matrix, unsupported dtype, steps < 1 or unknown
  coefficients, before anything runs.
  """
  _common.check_dtypes(OP, x=x)
  _common.check_matrix(OP, "x", x)
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"{OP}: steps must be an integer >= 1, got {steps!r}.")
  if isinstance(coeffs, str):
    if coeffs not in linalg.NEWTON_SCHULZ_COEFFS:
      raise ValueError(f"{OP}: unknown coeffs {coeffs!r}; known: "
                       f"{sorted(linalg.NEWTON_SCHULZ_COEFFS)}.")
    coeffs = linalg.NEWTON_SCHULZ_COEFFS[coeffs]
  a, b, c = map(float, coeffs)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  norm = jnp.linalg.norm(x.astype(jnp.float32))
  x = (x.astype(jnp.float32) / (norm + eps)).astype(x.dtype)
  for _ in range(steps):
    x = newton_schulz_step(x, a, b, c, implementation=implementation, block_sizes=block_sizes,
                           interpret=interpret)
  return x.T if transposed else x

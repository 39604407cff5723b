"""DoRA's column norms ``||W0 + s A B||_c`` without the dense sum in memory.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024): the
magnitude/direction split needs, per output column j of the (fan_in, fan_out)
matrix, ``n_j = ||W0[:, j] + s A B[:, j]||``.

* XLA: from the factors, ``n_j^2 = ||W0_j||^2 + 2 s (A^T W0)_j . B_j +
  s^2 B_j^T (A^T A) B_j`` (as `lowrank_jax.adapters.dora.dora_column_norm`):
  (r, fan_out) temporaries only.
* Pallas: a grid over (fan_out tiles, fan_in tiles) forms each tile of
  ``W0 + s A B`` in VMEM and accumulates its squared column sums, so the sum
  exists one tile at a time and never in HBM; this avoids the cancellation of
  the factor formula when the terms are large.

Backward (both, XLA), with ``D = g / n`` and ``C = W0 + s A B`` never formed:
``dA = s (W0 (D B^T) + s A (B D B^T))``, ``dB = s ((A^T W0) D + s (A^T A) B D)``,
and ``dW0 = W0 D + s A (B D)`` only when W0 is differentiated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lowrank_jax.kernels import _common

Array = jax.Array
OP = "dora_norm"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles over fan_out (``block_n``) and fan_in (``block_k``); multiples of 128 and 8."""

  block_n: int = 512
  block_k: int = 512


def reference(w0: Array, a: Array, b: Array, scale: float) -> Array:
  """The norms of the materialized ``W0 + s A B`` (the test oracle), float32."""
  f32 = lambda t: t.astype(jnp.float32)
  return jnp.linalg.norm(f32(w0) + scale * (f32(a) @ f32(b)), axis=0)


def _norm_xla(w0, a, b, scale):
  w0, a, b = (t.astype(jnp.float32) for t in (w0, a, b))
  squared = (jnp.sum(w0 * w0, axis=0) + 2.0 * scale * jnp.sum((a.T @ w0) * b, axis=0)
             + scale * scale * jnp.sum(b * ((a.T @ a) @ b), axis=0))
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def _norm_kernel(w0_ref, a_ref, b_ref, out_ref, acc_ref, *, scale):
  k = pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  tile = w0_ref[...].astype(jnp.float32) + scale * jnp.dot(
      a_ref[...], b_ref[...], preferred_element_type=jnp.float32)
  acc_ref[...] += jnp.sum(tile * tile, axis=0, keepdims=True)

  @pl.when(k == pl.num_programs(1) - 1)
  def _write():
    out_ref[...] = jnp.sqrt(acc_ref[...])


def _norm_pallas(w0, a, b, scale, block_sizes, interpret):
  fan_in, fan_out = w0.shape
  rank = a.shape[1]
  bn = _common.fit_block(fan_out, block_sizes.block_n, 128, "block_n")
  bk = _common.fit_block(fan_in, block_sizes.block_k, 8, "block_k")
  w0 = _common.pad_axis(w0, 0, bk)
  a = _common.pad_axis(a, 0, bk)
  out = pl.pallas_call(
      functools.partial(_norm_kernel, scale=scale),
      out_shape=jax.ShapeDtypeStruct((1, fan_out), jnp.float32),
      grid=(pl.cdiv(fan_out, bn), w0.shape[0] // bk),
      in_specs=[pl.BlockSpec((bk, bn), lambda j, k: (k, j)),
                pl.BlockSpec((bk, rank), lambda j, k: (k, 0)),
                pl.BlockSpec((rank, bn), lambda j, k: (0, j))],
      out_specs=pl.BlockSpec((1, bn), lambda j, k: (0, j)),
      scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="dora_column_norm",
  )(w0, a, b)
  return out[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm(w0, a, b, scale, implementation, block_sizes, interpret):
  if implementation == "pallas":
    return _norm_pallas(w0, a, b, scale, block_sizes, interpret)
  return _norm_xla(w0, a, b, scale)


def _norm_fwd(w0, a, b, scale, implementation, block_sizes, interpret):
  n = _norm(w0.value, a.value, b.value, scale, implementation, block_sizes, interpret)
  return n, (w0.value, a.value, b.value, n, w0.perturbed)


def _norm_bwd(scale, implementation, block_sizes, interpret, residuals, g):
  del implementation, block_sizes, interpret
  w0, a, b, n, w0_perturbed = residuals
  f32 = lambda t: t.astype(jnp.float32)
  w0f, af, bf = f32(w0), f32(a), f32(b)
  d = jnp.where(n > 0, g / jnp.where(n > 0, n, 1.0), 0.0)
  bd = bf * d[None, :]                       # B D, (r, fan_out)
  da = scale * (w0f @ bd.T + scale * af @ (bd @ bf.T))
  db = scale * ((af.T @ w0f) * d[None, :] + scale * (af.T @ af) @ bd)
  dw0 = (w0f * d[None, :] + scale * af @ bd).astype(w0.dtype) if w0_perturbed else None
  return dw0, da.astype(a.dtype), db.astype(b.dtype)


_norm.defvjp(_norm_fwd, _norm_bwd, symbolic_zeros=True)


def dora_norm(w0: Array, a: Array, b: Array, scale: float = 1.0, *,
              implementation: str | None = None, block_sizes: BlockSizes | None = None,
              interpret: bool = False) -> Array:
  """``||W0 + s A B||`` per output column, (fan_out,) float32, differentiable.

  Args:
    w0: (fan_in, fan_out); a: (fan_in, r); b: (r, fan_out); scale: s (a float).
    implementation, block_sizes, interpret: see `lowrank_jax.kernels._common`.
  """
  _common.check_dtypes(OP, w0=w0, a=a, b=b)
  for name, t in (("w0", w0), ("a", a), ("b", b)):
    _common.check_matrix(OP, name, t)
  if a.shape[0] != w0.shape[0] or b.shape[1] != w0.shape[1] or a.shape[1] != b.shape[0]:
    raise ValueError(f"{OP}: expected a (fan_in={w0.shape[0]}, r) and b (r, fan_out="
                     f"{w0.shape[1]}) with the same r; got a {tuple(a.shape)}, b {tuple(b.shape)}.")
  implementation = _common.resolve_implementation(OP, implementation, interpret)
  return _norm(w0, a, b, float(scale), implementation, block_sizes or BlockSizes(),
               bool(interpret))

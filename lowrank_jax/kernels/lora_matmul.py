"""Fused LoRA linear: ``y = x W0 + s (x A) B`` with a hand-written backward.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021).
Layout: x (..., fan_in), W0 (fan_in, fan_out), A (fan_in, r), B (r, fan_out).

Forward, with ``z = s (x A)`` (tokens x r, kept for the backward):

    y = x W0 + z B

Backward for an output cotangent g, with ``v = s (g B^T)``:

    dx = g W0^T + v A^T        dA = x^T v        dB = z^T g

and ``dW0 = x^T g`` only when W0 is differentiated (a frozen base, the usual
case, costs nothing: the custom_vjp sees which inputs are perturbed). The two
full-size products (the forward's and dx's) each fuse the rank-r term into the
dense matmul's accumulator, so the low-rank path adds no full-size pass over
the output. The rank-r products are plain XLA dots in both implementations;
the (fan_in, r) weight gradient is computed as ``(v^T x)^T`` behind an
optimization barrier, because XLA:CPU runs the (r, fan_in) orientation several
times faster than ``x^T v`` and would otherwise fold the transpose back into
the dot (docs/benchmarks.md, docs/kernels.md).

Merged-weight strategy (XLA, float32): when the batch has many tokens, the
two full-size products read the merged kernel ``W = W0 + s A B`` instead,

    y = x W        dx = g W^T        (dA, dB as above)

``W`` is formed in the forward and formed again in the backward (never saved:
a saved (fan_in, fan_out) temporary per layer would cost a model's worth of
activation memory). Forming it costs ``r fan_in fan_out`` flops and one pass
over a kernel-sized buffer; the factored form costs four passes over
token-sized buffers (``x A``, adding ``z B`` to y, ``g B^T``, adding ``v A^T``
to dx). So the merged form is chosen when ``tokens (fan_in + fan_out) >=
fan_in fan_out`` (at d = 1024: 512 tokens or more), only for float32 operands
(in bf16 the small ``s A B`` would be rounded away against W0), and never
with per-row weights. ``merge_weight=True/False`` forces either form.

The same core takes optional per-row weights ``m`` (tokens, r) on the rank
axis, ``z = s (x A) * m``; `lowrank_jax.kernels.grouped_lora` builds its
multi-adapter product on it.
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
OP = "lora_matmul"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the fused kernel: rows (tokens), output columns, contraction.

  An axis shorter than its block is taken whole. ``block_m`` must be a
  multiple of 8, ``block_n`` and ``block_k`` of 128 (TPU sublanes / lanes).
  """

  block_m: int = 256
  block_n: int = 256
  block_k: int = 512


def reference(x: Array, w0: Array, a: Array, b: Array, scale: float = 1.0) -> Array:
  """``x W0 + s (x A) B`` in float32 by plain jnp (the test oracle)."""
  f32 = lambda t: t.astype(jnp.float32)
  return f32(x) @ f32(w0) + scale * ((f32(x) @ f32(a)) @ f32(b))


# -- the fused product ``lhs W + z B`` (forward) / ``lhs W^T + z B^T`` (dx) ------------

def _fused_kernel(lhs_ref, w_ref, z_ref, b_ref, out_ref, acc_ref, *, transposed: bool):
  contract = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))

  @pl.when(pl.program_id(2) == 0)
  def _init():
    acc_ref[...] = jax.lax.dot_general(z_ref[...], b_ref[...], contract,
                                       preferred_element_type=jnp.float32)

  acc_ref[...] += jax.lax.dot_general(lhs_ref[...], w_ref[...], contract,
                                      preferred_element_type=jnp.float32)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _fused_pallas(lhs, w, z, b, *, transposed, out_dtype, block_sizes, interpret):
  rows, depth = lhs.shape
  cols = w.shape[0] if transposed else w.shape[1]
  rank = z.shape[1]
  bm = _common.fit_block(rows, block_sizes.block_m, 8, "block_m")
  bn = _common.fit_block(cols, block_sizes.block_n, 128, "block_n")
  bk = _common.fit_block(depth, block_sizes.block_k, 128, "block_k")
  lhs = _common.pad_axis(lhs, 1, bk)
  w = _common.pad_axis(w, 1 if transposed else 0, bk)
  if transposed:
    w_spec = pl.BlockSpec((bn, bk), lambda i, j, k: (j, k))
    b_spec = pl.BlockSpec((bn, rank), lambda i, j, k: (j, 0))
  else:
    w_spec = pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))
    b_spec = pl.BlockSpec((rank, bn), lambda i, j, k: (0, j))
  return pl.pallas_call(
      functools.partial(_fused_kernel, transposed=transposed),
      out_shape=jax.ShapeDtypeStruct((rows, cols), out_dtype),
      grid=(pl.cdiv(rows, bm), pl.cdiv(cols, bn), lhs.shape[1] // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)), w_spec,
                pl.BlockSpec((bm, rank), lambda i, j, k: (i, 0)), b_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="lora_fused_matmul",
  )(lhs, w, z, b)


def _fused_xla(lhs, w, z, b, *, transposed, out_dtype):
  contract = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  dense = jax.lax.dot_general(lhs, w, contract, preferred_element_type=jnp.float32)
  low_rank = jax.lax.dot_general(z, b, contract, preferred_element_type=jnp.float32)
  return (dense + low_rank).astype(out_dtype)


def _fused(lhs, w, z, b, *, transposed, out_dtype, implementation, block_sizes, interpret):
  if implementation == "pallas":
    return _fused_pallas(lhs, w, z, b, transposed=transposed, out_dtype=out_dtype,
                         block_sizes=block_sizes, interpret=interpret)
  return _fused_xla(lhs, w, z, b, transposed=transposed, out_dtype=out_dtype)


# -- the differentiable core on 2-D inputs -----------------------------------------------

def _rank_activations(x, a, row_weights, scale):
  """``s (x A) [* m]`` in float32, shape (tokens, r)."""
  z = jnp.dot(x, a, preferred_element_type=jnp.float32) * scale
  return z if row_weights is None else z * row_weights.astype(jnp.float32)


def _merged_kernel(w0, a, b, scale):
  """``W0 + s A B`` in float32, the kernel of the merged-weight strategy."""
  return w0.astype(jnp.float32) + scale * jnp.dot(a, b, preferred_element_type=jnp.float32)


def prefers_merged_weight(tokens: int, fan_in: int, fan_out: int, dtype) -> bool:
  """The cost rule of the module docstring: float32 and ``tokens (fan_in + fan_out) >= fan_in fan_out``."""
  return jnp.dtype(dtype) == jnp.float32 and tokens * (fan_in + fan_out) >= fan_in * fan_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _core(x, w0, a, b, row_weights, scale, implementation, block_sizes, interpret, merged):
  out, _ = _core_fwd_values(x, w0, a, b, row_weights, scale, implementation, block_sizes,
                            interpret, merged)
  return out


def _core_fwd_values(x, w0, a, b, row_weights, scale, implementation, block_sizes, interpret,
                     merged):
  out_dtype = _common.result_dtype(x.dtype, w0.dtype)
  z = _rank_activations(x, a, row_weights, scale).astype(b.dtype)
  if merged:
    out = jnp.dot(x, _merged_kernel(w0, a, b, scale),
                  preferred_element_type=jnp.float32).astype(out_dtype)
  else:
    out = _fused(x, w0, z, b, transposed=False, out_dtype=out_dtype,
                 implementation=implementation, block_sizes=block_sizes, interpret=interpret)
  return out, z


def _core_fwd(x, w0, a, b, row_weights, scale, implementation, block_sizes, interpret, merged):
  out, z = _core_fwd_values(x.value, w0.value, a.value, b.value,
                            None if row_weights is None else row_weights.value,
                            scale, implementation, block_sizes, interpret, merged)
  residuals = (x.value, w0.value, a.value, b.value,
               None if row_weights is None else row_weights.value, z, w0.perturbed)
  return out, residuals


def _core_bwd(scale, implementation, block_sizes, interpret, merged, residuals, g):
  x, w0, a, b, row_weights, z, w0_perturbed = residuals
  # v = s (g B^T) [* m], the cotangent of (x A).
  v = jax.lax.dot_general(g, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  v = v * scale if row_weights is None else v * (scale * row_weights.astype(jnp.float32))
  v = v.astype(a.dtype)
  if merged:
    dx = jax.lax.dot_general(g, _merged_kernel(w0, a, b, scale), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    dx = _fused(g, w0, v, a, transposed=True, out_dtype=x.dtype, implementation=implementation,
                block_sizes=block_sizes, interpret=interpret)
  tokens_first = (((0,), (0,)), ((), ()))
  # (r, fan_in) first, then transposed: the barrier keeps XLA from folding the
  # transpose back into the dot, i.e. into the slow (fan_in, r) orientation.
  da_t = jax.lax.dot_general(v, x, tokens_first, preferred_element_type=jnp.float32)
  da = jax.lax.optimization_barrier(da_t).T
  db = jax.lax.dot_general(z, g, tokens_first, preferred_element_type=jnp.float32)
  dw0 = None
  if w0_perturbed:
    dw0 = jax.lax.dot_general(x, g, tokens_first,
                              preferred_element_type=jnp.float32).astype(w0.dtype)
  d_weights = None if row_weights is None else jnp.zeros_like(row_weights)
  return dx, dw0, da.astype(a.dtype), db.astype(b.dtype), d_weights


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


def check_inputs(op: str, x, w0, a, b) -> None:
  """Shape and dtype checks shared by the LoRA-type kernels; errors name the operand."""
  _common.check_dtypes(op, x=x, w0=w0, a=a, b=b)
  _common.check_matrix(op, "w0", w0)
  if x.ndim < 1 or x.shape[-1] != w0.shape[0]:
    raise ValueError(f"{op}: x's last dim must equal w0's fan_in {w0.shape[0]}; got x "
                     f"{tuple(x.shape)}, w0 {tuple(w0.shape)}.")
  if a.shape[-2] != w0.shape[0] or b.shape[-1] != w0.shape[1] or a.shape[-1] != b.shape[-2]:
    raise ValueError(
        f"{op}: expected a (..., fan_in={w0.shape[0]}, r) and b (..., r, fan_out={w0.shape[1]}) "
        f"with the same r; got a {tuple(a.shape)}, b {tuple(b.shape)}.")


def lowrank_linear(x: Array, w0: Array, a: Array, b: Array, *, scale: float = 1.0,
                   row_weights: Array | None = None, implementation: str | None = None,
                   block_sizes: BlockSizes | None = None, interpret: bool = False,
                   merge_weight: bool | None = None) -> Array:
  """``x W0 + s ((x A) [* m]) B`` over leading dims of x; the shared core (no checks on m)."""
  implementation = _common.resolve_implementation(OP, implementation, interpret)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if row_weights is not None:
    row_weights = row_weights.reshape(x2.shape[0], a.shape[-1])
  if merge_weight is None:
    merge_weight = (implementation == "xla" and row_weights is None and prefers_merged_weight(
        x2.shape[0], *w0.shape, jnp.promote_types(x.dtype, w0.dtype)))
  elif merge_weight and row_weights is not None:
    raise ValueError(f"{OP}: merge_weight=True cannot apply per-row weights (one merged kernel "
                     "serves every row).")
  out = _core(x2, w0, a, b, row_weights, float(scale), implementation,
              block_sizes or BlockSizes(), bool(interpret), bool(merge_weight))
  return out.reshape(lead + (w0.shape[1],))


def lora_matmul(x: Array, w0: Array, a: Array, b: Array, *, scale: float = 1.0,
                implementation: str | None = None, block_sizes: BlockSizes | None = None,
                interpret: bool = False, merge_weight: bool | None = None) -> Array:
  """``y = x W0 + s (x A) B`` (see the module docstring), differentiable in x, A, B and W0.

  Args:
    x: (..., fan_in) activations.
    w0: (fan_in, fan_out) frozen base weight.
    a: (fan_in, r) and b: (r, fan_out), the LoRA factors.
    scale: s, a Python float (e.g. alpha / r).
    implementation: None (the dispatcher: Pallas on TPU, XLA elsewhere), 'xla'
      or 'pallas'.
    block_sizes: tiles of the Pallas kernel.
    interpret: run the Pallas kernel in the interpreter (CPU tests).
    merge_weight: read the merged kernel ``W0 + s A B`` in the two full-size
      products (module docstring); None applies the cost rule
      `prefers_merged_weight` on the XLA implementation.

  Returns:
    (..., fan_out) in the promoted dtype of x and w0; float32 accumulation.

  Raises:
    ValueError / TypeError: shapes that do not agree, unsupported dtypes, an
      unknown implementation, before anything runs.
  """
  check_inputs(OP, x, w0, a, b)
  _common.check_matrix(OP, "a", a)
  _common.check_matrix(OP, "b", b)
  return lowrank_linear(x, w0, a, b, scale=scale, implementation=implementation,
                        block_sizes=block_sizes, interpret=interpret, merge_weight=merge_weight)

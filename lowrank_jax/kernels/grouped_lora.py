"""Multi-adapter LoRA batches: every row of a batch uses its own adapter from a bank.

The operation of Punica's SGMV/BGMV kernels (Chen et al., "Punica:
Multi-Tenant LoRA Serving", 2023) and S-LoRA (Sheng et al., "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters", 2023): with adapter id ``g_m`` for row m,

    y_m = x_m W0 + s_{g_m} (x_m A_{g_m}) B_{g_m},

A bank (G, fan_in, r), B bank (G, r, fan_out), scales s (G,). An id of -1
selects no adapter (the row gets ``x_m W0``).

How it is computed (differs from Punica): the banks are laid side by side as
one rank-(G r) factor pair, ``A_cat`` (fan_in, G r) and ``B_cat`` (G r,
fan_out), and row m's rank activations are multiplied by the mask
``s_{g_m} [block of g_m]`` (tokens, G r), so the whole batch is one
`lowrank_jax.kernels.lora_matmul` product with per-row weights, with its fused
Pallas kernel and hand-written backward. No gather, sort or padding of rows;
the price is that the low-rank work grows with G r instead of r (Punica's
gathers keep it at r), which stays small beside the dense product while
``G r`` is well below fan_out (16 adapters of rank 16 on a 4096-wide layer:
6% of the dense flops per product).

The ids and scales are not differentiated. Ids are checked when they are
concrete; traced ids (under jit) outside [-1, G) give NaN rows, never a silent
result.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.kernels import lora_matmul as lora_kernel

Array = jax.Array
OP = "grouped_lora"
BlockSizes = lora_kernel.BlockSizes


def reference(x: Array, w0: Array, a_bank: Array, b_bank: Array, adapter_ids: Array,
              scales: Sequence[float]) -> Array:
  """Per-row gathered factors in float32 by plain jnp (the test oracle)."""
  f32 = lambda t: jnp.asarray(t, jnp.float32)
  ids = jnp.broadcast_to(adapter_ids.reshape(adapter_ids.shape + (1,) * (x.ndim - 1 - adapter_ids.ndim)),
                         x.shape[:-1])
  safe = jnp.maximum(ids, 0)
  scale = jnp.where(ids >= 0, f32(scales)[safe], 0.0)
  z = jnp.einsum("...k,...kr->...r", f32(x), f32(a_bank)[safe])
  return f32(x) @ f32(w0) + scale[..., None] * jnp.einsum("...r,...rn->...n", z, f32(b_bank)[safe])


def check_inputs(x, w0, a_bank, b_bank, adapter_ids, scales) -> tuple[float, ...]:
  """Shape, dtype and id checks; returns the scales as a tuple of G floats."""
  lora_kernel.check_inputs(OP, x, w0, a_bank, b_bank)
  if a_bank.ndim != 3 or b_bank.ndim != 3 or a_bank.shape[0] != b_bank.shape[0]:
    raise ValueError(f"{OP}: a_bank must be (G, fan_in, r) and b_bank (G, r, fan_out) with the "
                     f"same G; got {tuple(a_bank.shape)} and {tuple(b_bank.shape)}.")
  groups = a_bank.shape[0]
  if not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
    raise TypeError(f"{OP}: adapter_ids must be integers, got dtype {adapter_ids.dtype}.")
  if adapter_ids.shape != x.shape[:adapter_ids.ndim] or adapter_ids.ndim > x.ndim - 1:
    raise ValueError(f"{OP}: adapter_ids shape {tuple(adapter_ids.shape)} must be a prefix of x's "
                     f"row dims {tuple(x.shape[:-1])}.")
  if not isinstance(adapter_ids, jax.core.Tracer):
    ids = np.asarray(adapter_ids)
    bad = ids[(ids < -1) | (ids >= groups)]
    if bad.size:
      raise ValueError(f"{OP}: adapter_ids must be in [-1, {groups}) (-1: no adapter) for a bank "
                       f"of {groups} adapters; got {sorted(set(bad.tolist()))[:8]}.")
  scales = (float(scales),) * groups if np.ndim(scales) == 0 else tuple(map(float, scales))
  if len(scales) != groups:
    raise ValueError(f"{OP}: scales must be one float or {groups} floats, got {len(scales)}.")
  return scales


def row_weights(adapter_ids: Array, scales: Sequence[float], rank: int) -> Array:
  """The (rows, G r) mask ``s_g [block of g]``; -1 gives zeros, other bad ids NaN."""
  groups = len(scales)
  ids = adapter_ids.reshape(-1)
  onehot = jax.nn.one_hot(ids, groups, dtype=jnp.float32) * jnp.asarray(scales, jnp.float32)
  valid = (ids >= -1) & (ids < groups)
  onehot = jnp.where(valid[:, None], onehot, jnp.nan)
  return jnp.repeat(onehot, rank, axis=1)


def grouped_lora(x: Array, w0: Array, a_bank: Array, b_bank: Array, adapter_ids: Array, *,
                 scales: float | Sequence[float] = 1.0, implementation: str | None = None,
                 block_sizes: BlockSizes | None = None, interpret: bool = False) -> Array:
  """``y_m = x_m W0 + s_g (x_m A_g) B_g`` with g = adapter_ids[m] (module docstring).

  Args:
    x: (..., fan_in) activations.
    w0: (fan_in, fan_out) frozen base weight.
    a_bank: (G, fan_in, r); b_bank: (G, r, fan_out).
    adapter_ids: integer ids in [-1, G) of shape x.shape[:k] for some k (per
      sequence, per token, ...), broadcast over the remaining row dims.
    scales: s_g, one Python float for all adapters or G floats (static).
    implementation, block_sizes, interpret: as in `lora_matmul`.

  Returns:
    (..., fan_out), differentiable in x, the banks and W0.
  """
  scales = check_inputs(x, w0, a_bank, b_bank, adapter_ids, scales)
  groups, fan_in, rank = a_bank.shape
  ids = jnp.broadcast_to(
      adapter_ids.reshape(adapter_ids.shape + (1,) * (x.ndim - 1 - adapter_ids.ndim)),
      x.shape[:-1])
  a_cat = jnp.transpose(a_bank, (1, 0, 2)).reshape(fan_in, groups * rank)
  b_cat = b_bank.reshape(groups * rank, b_bank.shape[-1])
  return lora_kernel.lowrank_linear(
      x, w0, a_cat, b_cat, row_weights=row_weights(ids, scales, rank),
      implementation=implementation, block_sizes=block_sizes, interpret=interpret)

"""Structured initialization of attention: heads that start as random impulse (shift) filters.

Zheng et al., "Structured Initialization for Attention in Vision
Transformers" (NeurIPS 2025; earlier code osiriszjq/structured_init). A
convolutional inductive bias is put into a ViT through initialization only:
each head h gets a random offset (dy, dx) in a ``window x window`` box and
its attention map is fit to the shift matrix ``A_h`` on the token grid (token
(i, j) attends to (i + dy, j + dx)):

    min_{W_Q, W_K} || softmax(P W_Q W_K^T P^T / sqrt(d_head)) - A_h ||^2

by Adam, with P the inputs the attention sees at initialization (for the ViT:
the first block's LayerNorm of the positional embeddings). The fitted
``W_Q``/``W_K`` (dim, d_head) are written into the head's columns of the
``query``/``key`` projections. Here it is a jitted fit vmapped over heads.

What differs from the reference code: the shift wraps around the grid
(circular), so every target row is a one-hot distribution; the fit starts
from the layer's own kernels and uses no norm renormalization.

This is a model initialization, not a training-time reparameterization,
so it lives with the models: it applies to any attention module with
``query`` and ``key`` nnx.Linear projections of width ``heads * head_dim``
and attributes ``heads`` and ``head_dim`` (`lowrank_jax.models.layers.Attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Array = jax.Array


def shift_matrix(height: int, width: int, dy: int, dx: int) -> np.ndarray:
  """(N, N) one-hot rows, N = height * width: token (i, j) -> ((i+dy) % h, (j+dx) % w)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  target = ((rows + dy) % height) * width + (cols + dx) % width
  out = np.zeros((height * width, height * width), np.float32)
  out[np.arange(height * width), target.reshape(-1)] = 1.0
  return out


def random_offsets(key: Array, heads: int, window: int = 3) -> np.ndarray:
  """(heads, 2) integer offsets in [-(window // 2), window // 2]."""
  if window < 1 or window % 2 == 0:
    raise ValueError(f"window must be a positive odd integer, got {window}.")
  half = window // 2
  return np.asarray(jax.random.randint(key, (heads, 2), -half, half + 1))


def attention_maps(inputs: Array, wq: Array, wk: Array) -> Array:
  """``softmax(P W_Q W_K^T P^T / sqrt(d))`` per head: (H, N, N) from (N, D), (H, D, d)."""
  q = jnp.einsum("nd,hde->hne", inputs, wq)
  k = jnp.einsum("nd,hde->hne", inputs, wk)
  return jax.nn.softmax(jnp.einsum("hne,hme->hnm", q, k) / jnp.sqrt(wq.shape[-1]), axis=-1)


def fit_query_key(inputs: Array, targets: Array, wq: Array, wk: Array, *, steps: int = 500,
                  learning_rate: float = 0.01) -> tuple[Array, Array, Array]:
  """Adam on the MSE between `attention_maps` and ``targets`` (H, N, N); returns (wq, wk, mse)."""
  inputs = jnp.asarray(inputs, jnp.float32)
  tx = optax.adam(learning_rate)
  mse = lambda p: jnp.mean((attention_maps(inputs, *p) - targets) ** 2)

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      grads = jax.grad(mse)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params, mse(params)

  (wq, wk), err = run((jnp.asarray(wq, jnp.float32), jnp.asarray(wk, jnp.float32)))
  return wq, wk, err


def init_attention(attn: nnx.Module, inputs: Array, grid: tuple[int, int], *, key: Array,
                   window: int = 3, steps: int = 500, learning_rate: float = 0.01) -> float:
  """Fit the heads of ``attn`` to random shift maps on ``grid`` for ``inputs`` (N, dim), in place.

  Returns the final mean squared error of the maps. Raises ValueError if the
  module lacks the documented names or ``inputs`` do not match the grid.
  """
  for name in ("query", "key", "heads", "head_dim"):
    if not hasattr(attn, name):
      raise ValueError(f"structured init: {type(attn).__name__} has no '{name}'; it needs query/key "
                       "nnx.Linear projections and heads/head_dim attributes.")
  n = grid[0] * grid[1]
  if inputs.ndim != 2 or inputs.shape[0] != n:
    raise ValueError(f"structured init: inputs of shape {inputs.shape} for a {grid} grid; expected "
                     f"({n}, dim).")
  heads, head_dim = attn.heads, attn.head_dim
  offsets = random_offsets(key, heads, window)
  targets = jnp.asarray(np.stack([shift_matrix(*grid, int(dy), int(dx)) for dy, dx in offsets]))
  split = lambda kernel: kernel.reshape(kernel.shape[0], heads, head_dim).transpose(1, 0, 2)
  wq, wk, err = fit_query_key(inputs, targets, split(attn.query.kernel[...]),
                              split(attn.key.kernel[...]), steps=steps, learning_rate=learning_rate)
  merge = lambda w: w.transpose(1, 0, 2).reshape(w.shape[1], heads * head_dim)
  attn.query.kernel[...] = merge(wq).astype(attn.query.kernel.dtype)
  attn.key.kernel[...] = merge(wk).astype(attn.key.kernel.dtype)
  return float(err)


def init_vit(model: nnx.Module, *, key: Array, window: int = 3, steps: int = 500,
             learning_rate: float = 0.01) -> list[float]:
  """Structured init of every block of a `lowrank_jax.models.vit.ViT` (mean pooling).

  Each block is fit on its LayerNorm of the positional embeddings, the input
  its attention sees at init for an image of zeros. Returns the per-block MSE.
  """
  config = model.config
  if config.pool != "mean":
    raise ValueError("structured init needs a ViT with pool='mean' (no cls token), as the paper.")
  side = config.image_size // config.patch_size
  pos = model.pos_embed[...][0]
  errors = []
  for block, k in zip(model.blocks, jax.random.split(key, len(model.blocks))):
    errors.append(init_attention(block.attn, block.norm1(pos), (side, side), key=k, window=window,
                                 steps=steps, learning_rate=learning_rate))
  return errors

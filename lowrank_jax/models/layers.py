"""Building blocks shared by the reference models: sharded dense layers, GELU, RoPE, attention.

Kernels carry logical sharding names in their ``out_sharding`` metadata
('fsdp' on the larger, input-side axis) with eager sharding off, so models
build on one device with no mesh and the training loop shards them on a
('data', 'fsdp') mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

FSDP = "fsdp"


def sharded(names: tuple) -> dict:
  """Variable metadata giving logical sharding names without eager sharding."""
  return {"out_sharding": names, "eager_sharding": False}


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True,
          init_std: float | None = None) -> nnx.Linear:
  """nnx.Linear with its kernel sharded ('fsdp', None); lecun-normal init unless ``init_std``."""
  kernel_init = (nnx.initializers.normal(init_std) if init_std is not None
                 else nnx.initializers.lecun_normal())
  return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=kernel_init,
                    kernel_metadata=sharded((FSDP, None)), bias_metadata=sharded((None,)),
                    rngs=rngs)


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU as BERT and torch write it: ``x (1 + erf(x / sqrt 2)) / 2``.

  Hendrycks & Gimpel, "Gaussian Error Linear Units" (2016). The same function as
  ``jax.nn.gelu(x, approximate=False)``, which goes through ``erfc`` for accuracy
  far in the negative tail (there ``x Phi(x)`` is below 1e-6 in magnitude either
  way); XLA:CPU evaluates ``erf`` about twice as fast, and this is the formula of
  torch's ``F.gelu``, so BERT activations match transformers' term by term.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (Su et al., "RoFormer", 2021), LLaMA's half-split layout.

  ``x`` is (batch, seq, heads, head_dim); pairs (i, i + head_dim/2) rotate by
  angle ``position * base^(-2i/head_dim)``, so q.k depends on positions only
  through their difference.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions[..., :, None].astype(jnp.float32) * freqs  # (..., seq, half)
  cos = jnp.cos(angles)[..., None, :]
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              is_causal: bool = False) -> jax.Array:
  """Scaled dot-product attention ``softmax(q k^T / sqrt(d)) v`` of every model here.

  q, k, v and the result are (batch, seq, heads, head_dim); ``mask`` (bool) broadcasts to
  (batch, heads, q_seq, k_seq), True where a query may attend; ``is_causal`` adds the causal
  mask. Logits and softmax are float32 whatever the input dtype.

  Computed in the (batch, heads, seq, head_dim) layout with explicit transposes and q scaled
  before the product, the mask applied as an additive float32 bias (``finfo.min`` where
  masked; the logits are float32, so the sum stays finite and fully masked rows give a
  uniform softmax, as a select would): on XLA:CPU this forward + backward is ~20% faster than
  ``jax.nn.dot_product_attention``'s XLA path, which contracts in the (batch, seq, heads,
  head_dim) layout, and the bias is faster than a select over the full logits
  (benchmarks/attention_core.py; docs/benchmarks.md). Same function.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q * jnp.asarray(scale, q.dtype), k, v))
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
  if is_causal:
    causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:  # an additive bias of the mask's own (broadcast) shape, not a select
    logits = logits + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(probs @ v, 1, 2)


class Attention(nnx.Module):
  """Multi-head attention with projections named query, key, value, out.

  The projections are plain nnx.Linear layers over the flattened head axis, so
  adapters attach to them by path ('.../attn/query'). The core is `attention`.
  """

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, use_bias: bool = True,
               use_rope: bool = False, rope_base: float = 10000.0):
    if dim % heads:
      raise ValueError(f"dim={dim} must be divisible by heads={heads}.")
    self.heads = heads
    self.head_dim = dim // heads
    self.use_rope = use_rope
    self.rope_base = rope_base
    self.query = dense(dim, dim, use_bias=use_bias, rngs=rngs)
    self.key = dense(dim, dim, use_bias=use_bias, rngs=rngs)
    self.value = dense(dim, dim, use_bias=use_bias, rngs=rngs)
    self.out = dense(dim, dim, use_bias=use_bias, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False,
               positions: jax.Array | None = None) -> jax.Array:
    batch, seq, _ = x.shape
    split = lambda t: t.reshape(batch, seq, self.heads, self.head_dim)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    if self.use_rope:
      positions = jnp.arange(seq) if positions is None else positions
      q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
    out = attention(q, k, v, mask=mask, is_causal=is_causal)
    return self.out(out.reshape(batch, seq, -1))

"""A GPT-style decoder: RMSNorm, RoPE, SwiGLU MLP, causal attention (LLaMA layout).

Module paths for attach rules: ``embed``, ``blocks/<i>/attn/{query,key,value,out}``,
``blocks/<i>/mlp/{gate,up,down}``, ``blocks/<i>/{attn_norm,mlp_norm}``, ``norm``,
``head``. ``model(tokens)`` returns logits (batch, seq, vocab_size).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models import layers


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 256
  dim: int = 128
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 344
  max_len: int = 256
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))`` (Shazeer, "GLU Variants Improve Transformer", 2020)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.gate = layers.dense(dim, hidden, use_bias=False, rngs=rngs)
    self.up = layers.dense(dim, hidden, use_bias=False, rngs=rngs)
    self.down = layers.dense(hidden, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
    self.attn = layers.Attention(config.dim, config.heads, use_bias=False, use_rope=True,
                                 rope_base=config.rope_base, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(config.dim, config.mlp_dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x), is_causal=True)
    return x + self.mlp(self.mlp_norm(x))


class GPT(nnx.Module):
  """Decoder-only transformer language model."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.dim, rngs=rngs,
                           embedding_metadata=layers.sharded((None, layers.FSDP)))
    self.blocks = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.depth)])
    self.norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, rngs=rngs)
    self.head = None if config.tie_embeddings else layers.dense(
        config.dim, config.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.shape[-1] > self.config.max_len:
      raise ValueError(f"Sequence length {tokens.shape[-1]} exceeds max_len={self.config.max_len}.")
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return self.embed.attend(x) if self.head is None else self.head(x)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, in nats."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

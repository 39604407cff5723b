"""A flax.linen twin of `lowrank_jax.models.vit`, for the functional front end.

The same architecture and computation as the NNX ViT; Linen parameter paths
are ``params/patch_embed``, ``params/blocks_<i>/attn/{query,key,value,out}``,
``params/blocks_<i>/mlp/{up,down}``, ``params/blocks_<i>/{norm1,norm2}``,
``params/norm``, ``params/head`` (Linen names list entries ``blocks_<i>``).
`variables_from_nnx` copies an NNX ViT's weights into this layout, so both
front ends can be compared on the same weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models import layers
from lowrank_jax.models.vit import ViTConfig


class Attention(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    batch, seq, _ = x.shape
    split = lambda t: t.reshape(batch, seq, self.heads, self.dim // self.heads)
    q = split(nn.Dense(self.dim, name="query")(x))
    k = split(nn.Dense(self.dim, name="key")(x))
    v = split(nn.Dense(self.dim, name="value")(x))
    out = layers.attention(q, k, v)
    return nn.Dense(self.dim, name="out")(out.reshape(batch, seq, -1))


class MLP(nn.Module):
  dim: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.dim, name="down")(jax.nn.gelu(nn.Dense(self.hidden, name="up")(x)))


class EncoderBlock(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + Attention(c.dim, c.heads, name="attn")(nn.LayerNorm(epsilon=1e-6, name="norm1")(x))
    return x + MLP(c.dim, c.mlp_dim, name="mlp")(nn.LayerNorm(epsilon=1e-6, name="norm2")(x))


class ViT(nn.Module):
  """The ViT of `lowrank_jax.models.vit` in flax.linen; ``apply(variables, images)`` -> logits."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    p = c.patch_size
    x = nn.Conv(c.dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    tokens = c.num_patches + (1 if c.pool == "cls" else 0)
    pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, tokens, c.dim))
    if c.pool == "cls":
      cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, c.dim))
      x = jnp.concatenate([jnp.broadcast_to(cls_token, (x.shape[0], 1, c.dim)), x], 1)
    x = x + pos_embed
    for i in range(c.depth):
      x = EncoderBlock(c, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
    pooled = x[:, 0] if c.pool == "cls" else jnp.mean(x, axis=1)
    return nn.Dense(c.num_classes, name="head")(pooled)


def variables_from_nnx(model: nnx.Module) -> dict[str, Any]:
  """The Linen variables ``{'params': ...}`` holding the weights of an NNX ViT."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  blocks = state.pop("blocks")
  for i, block in blocks.items():
    state[f"blocks_{i}"] = block
  return {"params": state}

"""A small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021).

Pre-norm blocks with GELU MLPs. Module paths: ``patch_embed`` (an nnx.Conv with
stride = patch size), ``blocks/<i>/attn/{query,key,value,out}``,
``blocks/<i>/mlp/{up,down}``, ``blocks/<i>/{norm1,norm2}``, ``norm``, ``head``.
``model(images)`` takes (batch, height, width, channels) and returns logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 8
  patch_size: int = 2
  channels: int = 1
  num_classes: int = 10
  dim: int = 64
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 128
  pool: str = "cls"  # 'cls' or 'mean'

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}.")
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}.")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class MLP(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.up = layers.dense(dim, hidden, rngs=rngs)
    self.down = layers.dense(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class EncoderBlock(nnx.Module):

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(config.dim, rngs=rngs)
    self.attn = layers.Attention(config.dim, config.heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(config.dim, rngs=rngs)
    self.mlp = MLP(config.dim, config.mlp_dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    p = config.patch_size
    self.patch_embed = nnx.Conv(config.channels, config.dim, kernel_size=(p, p), strides=(p, p),
                                padding="VALID", rngs=rngs)
    tokens = config.num_patches + (1 if config.pool == "cls" else 0)
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, config.dim)))
    self.cls_token = (nnx.Param(jnp.zeros((1, 1, config.dim))) if config.pool == "cls" else None)
    self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.dim, rngs=rngs)
    self.head = layers.dense(config.dim, config.num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.patch_embed(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.cls_token is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])), x], 1)
    x = x + self.pos_embed[...]
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    pooled = x[:, 0] if self.cls_token is not None else jnp.mean(x, axis=1)
    return self.head(pooled)

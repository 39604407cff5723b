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


def _llama_name(path: str) -> str:
  """Our module path (dotted) -> the LLaMA checkpoint's module name."""
  parts = path.split(".")
  if parts[0] == "blocks":
    renames = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
               "attn.value": "self_attn.v_proj", "attn.out": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    return f"model.layers.{parts[1]}." + renames[".".join(parts[2:])]
  return {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}[path]


def from_pretrained(path: str) -> GPT:
  """A GPT from a LLaMA-format Hugging Face directory (config.json + model.safetensors).

  Names map as model.layers.i.self_attn.{q,k,v,o}_proj -> blocks/i/attn/{query,key,value,out},
  mlp.{gate,up,down}_proj -> mlp/{gate,up,down}, input/post_attention_layernorm ->
  attn_norm/mlp_norm. HF's LLaMA rotates half-split pairs, as `layers.rope` does. Grouped-query
  attention (num_key_value_heads != num_attention_heads), biases and RoPE scaling are refused.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from lowrank_jax.io import hf  # pylint: disable=g-import-not-at-top

  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  heads = c["num_attention_heads"]
  if c.get("num_key_value_heads", heads) != heads:
    raise ValueError(f"Grouped-query attention (num_key_value_heads={c['num_key_value_heads']}, "
                     f"num_attention_heads={heads}) is not supported by this GPT.")
  rope = c.get("rope_parameters") or {}  # newer transformers nest rope_theta here
  rope_type = rope.get("rope_type", "default")
  if c.get("attention_bias") or c.get("mlp_bias") or c.get("rope_scaling") or rope_type != "default":
    raise ValueError("LLaMA checkpoints with biases or RoPE scaling are not supported.")
  config = GPTConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], depth=c["num_hidden_layers"],
                     heads=heads, mlp_dim=c["intermediate_size"],
                     max_len=c.get("max_position_embeddings", 2048),
                     rope_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), norm_eps=c["rms_norm_eps"],
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)))
  return hf.load_new(lambda: GPT(config, rngs=nnx.Rngs(0)),
                     hf.read_safetensors(os.path.join(path, "model.safetensors")), _llama_name)


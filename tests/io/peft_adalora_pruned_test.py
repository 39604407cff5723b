"""AdaLoRA after budget pruning in PEFT's format: rank_pattern and trimmed lora_A / lora_E / lora_B.

PEFT's AdaLoRA keeps the allocator's boolean masks in ``rank_pattern``
(``'<module>.lora_E': [bool] * init_r``) and saves only the kept triplets.
Both directions on the torch / NNX twin network of peft_parity_test.py: a
model pruned by PEFT's own ``update_and_allocate`` imports with PEFT's
outputs, and a model pruned by our BudgetAllocator exports to a file that
PEFT loads with our outputs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import io as lrj_io
from lowrank_jax.adapters.adalora import BudgetAllocator
from lowrank_jax.attach import adapters as adapter_sites

from lrj_testing import randomize_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import peft_parity_test as twin  # pylint: disable=g-import-not-at-top,wrong-import-position

INIT_R, TARGET_R, STEPS, TFINAL = 4, 2, 6, 2


def _pruned_by_peft(tmp_path):
  """A PEFT AdaLoRA model pruned by PEFT's allocator on a tiny loss, saved; and its twin."""
  torch_net, net = twin._twins(seed=3)
  config = peft.AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=5, total_step=STEPS,
                              tinit=0, tfinal=TFINAL, deltaT=1, target_modules=twin.TARGETS)
  model = peft.get_peft_model(torch_net, config).double()
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
  x = torch.from_numpy(twin._x(seed=5)).double()
  for step in range(STEPS):
    (model(x) ** 2).mean().backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()
  with torch.no_grad():  # round to float32 so both libraries hold the same numbers
    for p in model.parameters():
      p.copy_(p.float().double())
  model.eval()
  model.save_pretrained(str(tmp_path))
  return model, net


def test_a_peft_pruned_adapter_imports_with_peft_outputs_and_masks(tmp_path):
  model, net = _pruned_by_peft(tmp_path)
  pattern = json.load(open(tmp_path / "adapter_config.json"))["rank_pattern"]
  tensors = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
  assert any(not all(mask) for mask in pattern.values())  # PEFT really pruned and trimmed
  assert tensors["base_model.model.out.lora_E"].shape == (sum(pattern["out.lora_E"]), 1)
  x = twin._x(seed=7)
  lrj_io.import_peft(str(tmp_path), net)
  np.testing.assert_allclose(np.asarray(net(jnp.asarray(x))), twin._torch_out(model, x),
                             rtol=1e-5, atol=1e-5)
  for path, adapter in adapter_sites(net):
    mask = np.asarray(pattern[path.replace("/", ".") + ".lora_E"])
    np.testing.assert_array_equal(np.asarray(adapter.rank_mask[...]) > 0, mask, err_msg=path)
    assert np.all(np.asarray(adapter.core[...])[~mask] == 0), path
    assert adapter.core.shape == (INIT_R,)  # ours keeps init_r slots, PEFT's ranknum


def test_our_pruned_adapter_exports_as_peft_saves_it_and_loads_in_peft(tmp_path):
  torch_net, net = twin._twins()
  twin._attach(net, "adalora", rank=INIT_R, alpha=5.0)
  randomize_adapters(net, 2, 0.3)
  allocator = BudgetAllocator(net, target_rank=TARGET_R, total_step=STEPS, tfinal=TFINAL)
  x = jnp.asarray(twin._x())
  loss = lambda m: jnp.mean(m(x) ** 2)
  for step in range(1, STEPS + 1):
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, lrj.AdapterParam))(net)
    nnx.update(net, jax.tree_util.tree_map(lambda p, g: p - 0.5 * g,
                                           nnx.state(net, lrj.AdapterParam), grads))
    allocator.observe(grads)
    net, _ = allocator(net, None, step)
  ranks = allocator.ranks(net)
  assert sum(ranks.values()) == TARGET_R * len(ranks) and min(ranks.values()) < INIT_R
  lrj_io.export_peft(net, str(tmp_path))

  config = json.load(open(tmp_path / "adapter_config.json"))
  tensors = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
  for path, adapter in adapter_sites(net):
    name = path.replace("/", ".")
    mask = np.asarray(allocator.rank_pattern[path])
    assert config["rank_pattern"][name + ".lora_E"] == mask.tolist()
    assert tensors[f"base_model.model.{name}.lora_A"].shape == (mask.sum(), adapter.view.fan_in)
    assert tensors[f"base_model.model.{name}.lora_B"].shape == (adapter.view.fan_out, mask.sum())
  loaded = twin._loaded_in_peft(torch_net, tmp_path, np.asarray(x), np.asarray(net(x)))
  for name in twin.TARGETS:
    layer = loaded.base_model.model.get_submodule(name)
    assert layer.r["default"] == ranks[name.replace(".", "/")]

  _, fresh = twin._twins()  # and back: the same masks and outputs
  lrj_io.import_peft(str(tmp_path), fresh)
  np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(net(x)), rtol=1e-6, atol=1e-6)
  assert {p: int(np.sum(np.asarray(a.rank_mask[...]))) for p, a in adapter_sites(fresh)} == ranks


def test_an_unpruned_adapter_exports_without_rank_pattern(tmp_path):
  _, net = twin._twins()
  twin._attach(net, "adalora", rank=3)
  lrj_io.export_peft(net, str(tmp_path))
  assert json.load(open(tmp_path / "adapter_config.json"))["rank_pattern"] is None


def _edit_config(path, edit):
  config = json.load(open(path / "adapter_config.json"))
  edit(config)
  json.dump(config, open(path / "adapter_config.json", "w"))


def test_bad_rank_patterns_are_refused_and_the_model_is_left_unchanged(tmp_path):
  _pruned_by_peft(tmp_path)
  pattern = json.load(open(tmp_path / "adapter_config.json"))["rank_pattern"]

  def _refused(edit, match):
    _edit_config(tmp_path, edit)
    _, net = twin._twins()
    with pytest.raises(lrj_io.PeftFormatError, match=match):
      lrj_io.import_peft(str(tmp_path), net)
    assert twin._no_adapters(net)
    _edit_config(tmp_path, lambda c: c.__setitem__("rank_pattern", dict(pattern)))

  _refused(lambda c: c["rank_pattern"].__setitem__("out.lora_E", [True] * (INIT_R - 1)),
           r"rank_pattern entry 'out.lora_E'.*init_r = 4 booleans, got 3")
  _refused(lambda c: c["rank_pattern"].__setitem__("layers.7.query.lora_E", [True] * INIT_R),
           r"rank_pattern names \['layers.7.query.lora_E'\], which are not layers")
  pruned = next(key for key, mask in pattern.items() if not all(mask))
  module = pruned[:-len(".lora_E")]
  _refused(lambda c: c["rank_pattern"].__setitem__(pruned, [True] * INIT_R),  # disagrees with the file
           rf"'base_model.model.{module}.lora_A' has shape \(\d, \d+\) but the model wants \(4, ")

"""The PEFT formats of the zoo methods on 2-D conv layers: LoHa, HRA, AdaLoRA, HUT exactly, the rest refused.

A torch network of two nn.Conv2d layers and its nnx.Conv twin share weights
(torch (out, in, kh, kw) = our (kh, kw, in, out) transposed). PEFT flattens a
conv filter in (in, kh, kw) order, ours in (kh, kw, in) order; the methods whose
math commutes with that permutation export and import exactly (same outputs,
same merged kernels); the others raise PeftFormatError naming the reason.
"""

from __future__ import annotations

import json

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

import peft_parity_test as twin  # pylint: disable=g-import-not-at-top,wrong-import-position

CHANNELS = (2, 4, 3)
TARGETS = ["convs.0", "convs.1"]
WINDOWS = ((3, 2), (2, 2))  # a non-square window tells (kh, kw) apart


class TorchNet(torch.nn.Module):

  def __init__(self, windows):
    super().__init__()
    self.convs = torch.nn.ModuleList([torch.nn.Conv2d(CHANNELS[i], CHANNELS[i + 1], windows[i])
                                      for i in range(2)])

  def forward(self, x):
    return self.convs[1](torch.tanh(self.convs[0](x)))


class Net(nnx.Module):

  def __init__(self, torch_net, windows):
    rngs = nnx.Rngs(0)
    self.convs = nnx.List([nnx.Conv(CHANNELS[i], CHANNELS[i + 1], windows[i], padding="VALID",
                                    rngs=rngs) for i in range(2)])
    for ours, theirs in zip(self.convs, torch_net.convs):
      ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().transpose(2, 3, 1, 0))
      ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())

  def __call__(self, x):
    return self.convs[1](jnp.tanh(self.convs[0](x)))


def _twins(windows=WINDOWS, seed=0):
  torch.manual_seed(seed)
  torch_net = TorchNet(windows).double()
  with torch.no_grad():  # float32 values, held in float64 by torch
    for p in torch_net.parameters():
      p.copy_(p.float().double())
  return torch_net, Net(torch_net, windows)


def _x(seed=1):
  return np.random.default_rng(seed).standard_normal((2, 7, 6, CHANNELS[0])).astype(np.float32)


def _torch_out(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2)).double()).numpy().transpose(0, 2, 3, 1)


def _prune(net):
  """Our allocator's masking step with a fixed pattern (one triplet of each layer pruned)."""
  pattern = {p: jnp.arange(a.core.shape[0]) != i for i, (p, a) in enumerate(adapter_sites(net))}
  BudgetAllocator._apply_pattern(net, pattern)  # pylint: disable=protected-access
  return pattern


EXPORT_CASES = [
    ("loha", dict(rank=3, alpha=5.0), WINDOWS, None),
    ("hra", dict(rank=4), ((3, 3), (2, 2)), None),
    ("adalora", dict(rank=3, alpha=5.0), WINDOWS, None),
    ("adalora", dict(rank=3, alpha=5.0), WINDOWS, _prune),
    ("hut", dict(rank=3, alpha=2.0), WINDOWS, None),  # hira_A (r, in, kh, kw), hira_B (out, r, 1, 1)
]


@pytest.mark.parametrize("method,hp,windows,edit", EXPORT_CASES,
                         ids=[f"{m}-{i}" for i, (m, *_) in enumerate(EXPORT_CASES)])
def test_export_on_conv_loads_in_peft_with_same_outputs_and_merge(method, hp, windows, edit,
                                                                  tmp_path):
  torch_net, net = _twins(windows)
  lrj.attach(net, [(r"convs/\d", lrj.adapters.get(method, **hp))], rngs=nnx.Rngs(5))
  randomize_adapters(net, 2, 0.3)
  if edit is not None:
    edit(net)
  x = _x()
  ours = np.asarray(net(jnp.asarray(x)))
  lrj_io.export_peft(net, str(tmp_path))
  loaded = twin._loaded_in_peft(torch_net, tmp_path, x, ours, torch_out=_torch_out)
  merged_torch = loaded.merge_and_unload()
  lrj.merge(net)
  for ours_conv, theirs in zip(net.convs, merged_torch.convs):
    np.testing.assert_allclose(np.asarray(ours_conv.kernel[...]).transpose(3, 2, 0, 1),
                               theirs.weight.detach().numpy(), rtol=1e-5, atol=1e-5)


IMPORT_CASES = [
    ("loha", lambda: peft.LoHaConfig(r=3, alpha=5, target_modules=TARGETS), WINDOWS, "hada_"),
    ("hra", lambda: peft.HRAConfig(r=4, target_modules=TARGETS), ((3, 3), (2, 2)), "hra_u"),
    ("adalora", lambda: peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=5, total_step=10,
                                           target_modules=TARGETS), WINDOWS, "lora_"),
    ("hut", lambda: peft.HiraConfig(r=3, target_modules=TARGETS), WINDOWS, "hira_"),
]


@pytest.mark.parametrize("method,config,windows,trained", IMPORT_CASES,
                         ids=[m for m, *_ in IMPORT_CASES])
def test_import_of_a_peft_conv_adapter_gives_peft_outputs(method, config, windows, trained,
                                                          tmp_path):
  torch_net, net = _twins(windows, seed=3)
  model = peft.get_peft_model(torch_net, config()).double()
  twin._perturb_trained(model, trained)
  model.eval()
  x = _x(seed=5)
  expected = _torch_out(model, x)
  model.save_pretrained(str(tmp_path))
  lrj_io.import_peft(str(tmp_path), net)
  assert {type(a.spec) for _, a in adapter_sites(net)} == {type(lrj.adapters.get(method))}
  np.testing.assert_allclose(np.asarray(net(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


REFUSED = [
    ("lokr", dict(rank=2), "lokr_w2 \\(out_k, in_n, kh, kw\\)"),
    ("oft", dict(block_size=2), "rotates contiguous blocks of the filter flattened in"),
    ("boft", dict(butterfly_factors=1, block_size=2), "rotates contiguous blocks"),
    ("vera", dict(rank=2), "exists for nn.Linear only"),
    ("fourierft", dict(n_frequency=4, seed=0), "exists for nn.Linear only"),
    ("miss", dict(rank=2), "exists for nn.Linear only"),
]


@pytest.mark.parametrize("method,hp,reason", REFUSED, ids=[m for m, *_ in REFUSED])
def test_methods_without_an_exact_conv_mapping_are_refused_with_the_reason(method, hp, reason,
                                                                          tmp_path):
  _, net = _twins()
  lrj.attach(net, [(r"convs/\d", lrj.adapters.get(method, **hp))], rngs=nnx.Rngs(5))
  with pytest.raises(lrj_io.PeftFormatError,
                     match=rf"'convs/0' is a 2-D conv layer .*no exact conv mapping: .*{reason}"):
    lrj_io.export_peft(net, str(tmp_path))


def test_peft_conv_files_we_cannot_map_are_refused_on_import(tmp_path):
  torch_net, net = _twins(((2, 2), (2, 2)))
  peft.get_peft_model(torch_net, peft.OFTConfig(r=0, oft_block_size=2, target_modules=TARGETS)
                      ).save_pretrained(str(tmp_path / "oft"))
  with pytest.raises(lrj_io.PeftFormatError, match="OFT format has no exact conv mapping"):
    lrj_io.import_peft(str(tmp_path / "oft"), net)
  assert twin._no_adapters(net)

  torch_net, net = _twins()
  peft.get_peft_model(torch_net, peft.LoHaConfig(r=2, use_effective_conv2d=True,
                                                 target_modules=TARGETS)
                      ).save_pretrained(str(tmp_path / "loha"))
  with pytest.raises(lrj_io.PeftFormatError, match="use_effective_conv2d=True \\(a CP decomposition"):
    lrj_io.import_peft(str(tmp_path / "loha"), net)
  assert twin._no_adapters(net)


def test_a_hira_conv_file_for_another_window_names_key_and_shapes(tmp_path):
  _, net = _twins()
  lrj.attach(net, [(r"convs/\d", lrj.adapters.hut(rank=2))], rngs=nnx.Rngs(5))
  lrj_io.export_peft(net, str(tmp_path))
  _, other = _twins(((2, 2), (2, 2)))
  with pytest.raises(lrj_io.PeftFormatError,
                     match=r"'base_model.model.convs.0.hira_A' has shape \(2, 2, 3, 2\) but the "
                     r"model wants \(2, 2, 2, 2\) for layer 'convs/0'"):
    lrj_io.import_peft(str(tmp_path), other)
  assert twin._no_adapters(other)


def test_hra_on_a_non_square_window_is_refused(tmp_path):
  _, net = _twins()
  lrj.attach(net, [(r"convs/\d", lrj.adapters.hra(rank=2))], rngs=nnx.Rngs(5))
  with pytest.raises(lrj_io.PeftFormatError, match="'convs/0' has a 3 x 2 window; PEFT's HRA"):
    lrj_io.export_peft(net, str(tmp_path))


def test_pruned_conv_export_writes_the_rank_pattern(tmp_path):
  _, net = _twins()
  lrj.attach(net, [(r"convs/\d", lrj.adapters.adalora(rank=3))], rngs=nnx.Rngs(5))
  pattern = _prune(net)
  lrj_io.export_peft(net, str(tmp_path))
  config = json.load(open(tmp_path / "adapter_config.json"))
  assert config["rank_pattern"] == {f"{p.replace('/', '.')}.lora_E": np.asarray(m).tolist()
                                    for p, m in pattern.items()}

"""Numerical parity with PEFT + torch, and the PEFT file format in both directions.

A small torch network and its NNX twin share module names and weights; the
same adapter weights must give the same outputs in both libraries.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import io as lrj_io
from lowrank_jax.attach import adapters as adapter_sites

from lrj_testing import randomize_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

D_IN, D_HID, D_OUT = 12, 10, 6
TARGETS = ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value", "out"]


class TorchBlock(torch.nn.Module):

  def __init__(self, d):
    super().__init__()
    self.query = torch.nn.Linear(d, D_HID)
    self.value = torch.nn.Linear(d, D_HID)

  def forward(self, x):
    return torch.tanh(self.query(x)) + self.value(x)


class TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.layers = torch.nn.ModuleList([TorchBlock(D_IN), TorchBlock(D_HID)])
    self.out = torch.nn.Linear(D_HID, D_OUT)

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.out(x)


class Block(nnx.Module):

  def __init__(self, d, rngs):
    self.query = nnx.Linear(d, D_HID, rngs=rngs)
    self.value = nnx.Linear(d, D_HID, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.query(x)) + self.value(x)


class Net(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([Block(D_IN, rngs), Block(D_HID, rngs)])
    self.out = nnx.Linear(D_HID, D_OUT, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.out(x)


def _twins(seed=0):
  torch.manual_seed(seed)
  torch_net = TorchNet().double()
  net = Net(nnx.Rngs(seed))
  for name, module in torch_net.named_modules():
    if isinstance(module, torch.nn.Linear):
      ours = net
      for part in name.split("."):
        ours = ours[int(part)] if part.isdigit() else getattr(ours, part)
      ours.kernel[...] = jnp.asarray(module.weight.detach().numpy().T, jnp.float32)
      ours.bias[...] = jnp.asarray(module.bias.detach().numpy(), jnp.float32)
  # Round the torch weights to float32 so both libraries hold identical numbers.
  with torch.no_grad():
    for p in torch_net.parameters():
      p.copy_(p.float().double())
  return torch_net, net


def _x(seed=1, n=7):
  return np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32)


def _torch_out(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x).double()).numpy()


def _loaded_in_peft(torch_net, path, x, ours, torch_out=_torch_out, tol=1e-5):
  """PEFT's model loaded from ``path`` onto ``torch_net`` (float64, eval), checked to give ``ours``."""
  loaded = peft.PeftModel.from_pretrained(torch_net, str(path)).double()
  loaded.eval()
  np.testing.assert_allclose(torch_out(loaded, x), ours, rtol=tol, atol=tol)
  return loaded


def _attach(net, method, **hp):
  spec = lrj.adapters.get(method, **hp)
  lrj.attach(net, [(r"layers/\d/(query|value)|out", spec)], rngs=nnx.Rngs(5))


def _perturb_trained(model, trained, seed=4):
  """Move PEFT's parameters whose names contain ``trained`` off their init (float32 values)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if trained in name:
        p.add_(0.3 * torch.randn_like(p)).copy_(p.float().double())


def _no_adapters(net):
  return not any(isinstance(m, lrj.adapters.Adapter) for _, m in nnx.iter_graph(net))


CASES = [
    ("lora", dict(rank=3, alpha=6.0)),
    ("lora", dict(rank=4, alpha=3.0, rslora=True)),
    ("lora", dict(rank=2, alpha=2.0, use_bias=True)),
    ("dora", dict(rank=3, alpha=6.0)),
]


@pytest.mark.parametrize("method,hp", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_export_loads_in_peft_with_same_outputs_and_merge(method, hp, tmp_path):
  torch_net, net = _twins()
  _attach(net, method, **hp)
  randomize_adapters(net, 2, 0.3)
  x = _x()
  ours = np.asarray(net(jnp.asarray(x)))
  lrj_io.export_peft(net, str(tmp_path))
  loaded = _loaded_in_peft(torch_net, tmp_path, x, ours)
  # Merged weights equal PEFT's merge_and_unload.
  merged_torch = loaded.merge_and_unload()
  lrj.merge(net)
  for name in TARGETS:
    ours_layer = net
    theirs = merged_torch
    for part in name.split("."):
      ours_layer = ours_layer[int(part)] if part.isdigit() else getattr(ours_layer, part)
      theirs = theirs[int(part)] if part.isdigit() else getattr(theirs, part)
    np.testing.assert_allclose(np.asarray(ours_layer.kernel[...]).T,
                               theirs.weight.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_layer.bias[...]), theirs.bias.detach().numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_import_of_a_peft_adapter_gives_peft_outputs(use_dora, tmp_path):
  torch_net, net = _twins(seed=3)
  config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, use_dora=use_dora)
  model = peft.get_peft_model(torch_net, config).double()
  _perturb_trained(model, "lora_")
  model.eval()
  x = _x(seed=5)
  expected = _torch_out(model, x)
  model.save_pretrained(str(tmp_path))
  lrj_io.import_peft(str(tmp_path), net)
  assert isinstance(net.out, lrj.adapters.DoRA if use_dora else lrj.adapters.LoRA)
  np.testing.assert_allclose(np.asarray(net(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_one_sgd_step_with_the_same_gradient_matches(method, tmp_path):
  torch_net, net = _twins(seed=6)
  _attach(net, method, rank=2, alpha=4.0)
  randomize_adapters(net, 7, 0.3)
  lrj_io.export_peft(net, str(tmp_path))
  model = peft.PeftModel.from_pretrained(torch_net, str(tmp_path), is_trainable=True).double()
  x = _x(seed=8)
  lr = 0.05
  loss = (model(torch.from_numpy(x).double()) ** 2).mean()
  loss.backward()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.requires_grad:
        p -= lr * p.grad

  def loss_fn(net):
    return jnp.mean(net(jnp.asarray(x)) ** 2)

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, lrj.AdapterParam))(net)
  nnx.update(net, jax.tree_util.tree_map(lambda p, g: p - lr * g,
                                         nnx.state(net, lrj.AdapterParam), grads))
  model.eval()
  x_new = _x(seed=9)
  np.testing.assert_allclose(np.asarray(net(jnp.asarray(x_new))), _torch_out(model, x_new),
                             rtol=1e-5, atol=1e-5)


def _align_signs(ours, theirs, axis):
  """Flip the sign of each rank component of ``ours`` to match ``theirs``."""
  dots = np.sum(ours * theirs, axis=axis, keepdims=True)
  return ours * np.where(dots < 0, -1.0, 1.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])  # PEFT has no MiLoRA
def test_deterministic_inits_equal_peft_up_to_sign(init, tmp_path):
  torch_net, net = _twins(seed=10)
  config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=init)
  model = peft.get_peft_model(torch_net.float(), config)  # PEFT's SVD/QR inits need float32
  _attach(net, "lora", rank=3, alpha=6.0, init=init)
  adapters = dict(adapter_sites(net))
  for name in TARGETS:
    adapter = adapters[name.replace(".", "/")]
    theirs = model.base_model.model
    for part in name.split("."):
      theirs = theirs[int(part)] if part.isdigit() else getattr(theirs, part)
    a_theirs = theirs.lora_A["default"].weight.detach().double().numpy().T
    b_theirs = theirs.lora_B["default"].weight.detach().double().numpy().T
    a_ours = np.asarray(adapter.lora_a[...], np.float64)
    b_ours = np.asarray(adapter.lora_b[...], np.float64)
    np.testing.assert_allclose(_align_signs(a_ours, a_theirs, 0), a_theirs, atol=1e-4)
    np.testing.assert_allclose(_align_signs(b_ours, b_theirs, 1), b_theirs, atol=1e-4)
    np.testing.assert_allclose(np.asarray(adapter.base.kernel[...]).T,
                               theirs.base_layer.weight.detach().double().numpy(), atol=1e-4)


def test_weight_aware_export_recomputes_the_residual_in_peft(tmp_path):
  torch_net, net = _twins(seed=11)
  _attach(net, "lora", rank=2, alpha=2.0, init="pissa")
  randomize_adapters(net, 12, 0.3)
  lrj_io.export_peft(net, str(tmp_path))
  assert json.load(open(tmp_path / "adapter_config.json"))["init_lora_weights"] == "pissa"
  x = _x(seed=13)
  _loaded_in_peft(torch_net.float(), tmp_path, x, np.asarray(net(jnp.asarray(x))), tol=1e-4)


# -- bad input ---------------------------------------------------------------------


def _exported(tmp_path, **hp):
  _, net = _twins()
  _attach(net, "lora", **(hp or dict(rank=2)))
  lrj_io.export_peft(net, str(tmp_path))
  return tmp_path


def _unchanged(net):
  return not lrj.summary(net).count("lora")


def test_adapter_for_another_base_names_key_and_shapes(tmp_path):
  path = _exported(tmp_path)
  import safetensors.numpy as stn
  tensors = stn.load_file(str(path / "adapter_model.safetensors"))
  key = "base_model.model.out.lora_B.weight"
  tensors[key] = np.zeros((D_OUT + 1, 2), np.float32)
  stn.save_file(tensors, str(path / "adapter_model.safetensors"))
  _, net = _twins()
  with pytest.raises(lrj_io.PeftFormatError, match=r"'base_model.model.out.lora_B.weight' has shape \(7, 2\).*wants \(6, 2\)"):
    lrj_io.import_peft(str(path), net)
  assert _unchanged(net)


def test_missing_tensor_and_unknown_method_and_corrupt_file(tmp_path):
  path = _exported(tmp_path)
  import safetensors.numpy as stn
  tensors = stn.load_file(str(path / "adapter_model.safetensors"))
  del tensors["base_model.model.layers.0.value.lora_A.weight"]
  stn.save_file(tensors, str(path / "adapter_model.safetensors"))
  _, net = _twins()
  with pytest.raises(lrj_io.PeftFormatError, match=r"lacks 'base_model.model.layers.0.value.lora_A.weight'"):
    lrj_io.import_peft(str(path), net)
  assert _unchanged(net)

  config = json.load(open(path / "adapter_config.json"))
  config["peft_type"] = "IA3"
  json.dump(config, open(path / "adapter_config.json", "w"))
  with pytest.raises(lrj_io.PeftFormatError, match="'IA3' is not supported"):
    lrj_io.import_peft(str(path), net)

  corrupt = tmp_path / "corrupt"
  os.makedirs(corrupt)
  good = _exported(tmp_path / "good")
  data = open(good / "adapter_model.safetensors", "rb").read()
  open(corrupt / "adapter_model.safetensors", "wb").write(data[: len(data) // 2])
  open(corrupt / "adapter_config.json", "w").write(open(good / "adapter_config.json").read())
  with pytest.raises(lrj_io.PeftFormatError, match="not a readable safetensors file"):
    lrj_io.import_peft(str(corrupt), net)
  assert _unchanged(net)


def test_export_rejects_an_init_peft_cannot_rebuild(tmp_path):
  _, net = _twins()
  _attach(net, "lora", rank=2, init="milora")
  with pytest.raises(lrj_io.PeftFormatError, match="'milora' has no PEFT equivalent"):
    lrj_io.export_peft(net, str(tmp_path))


def test_export_rejects_mixed_lora_and_dora(tmp_path):
  _, net = _twins()
  lrj.attach(net, [("out", lrj.adapters.dora(rank=2)), (r"layers/0/query", lrj.adapters.lora(rank=2))],
             rngs=nnx.Rngs(0))
  with pytest.raises(lrj_io.PeftFormatError, match="one use_dora per adapter"):
    lrj_io.export_peft(net, str(tmp_path))


# -- methods without a PEFT format: export as the closest rank-r LoRA ---------------


class _DenseDeltaSpec(lrj.AdapterSpec):
  """A test-only method: a full trainable (fan_in, fan_out) update and bias update."""

  name = "dense_delta_for_test"

  def build(self, base, *, rngs, calibration=None, path=""):
    return _DenseDelta(base, self, lrj.adapters.view_of(base, path), path)

  def num_params(self, fan_in, fan_out):
    return fan_in * fan_out + fan_out


class _DenseDelta(lrj.adapters.Adapter):

  def __init__(self, base, spec, view, path):
    super().__init__(base, spec, view, path)
    self.update = lrj.AdapterParam(jnp.zeros((view.fan_in, view.fan_out)))
    self.bias_update = lrj.AdapterParam(jnp.zeros((view.fan_out,)))

  def delta_matrix(self):
    return self.update[...]

  def adapter_forward(self, x, **kwargs):
    return self.base(x, **kwargs) + x @ self.update[...] + self.bias_update[...]

  def merge(self):
    merged = super().merge()
    merged.bias[...] = merged.bias[...] + self.bias_update[...]
    return merged


def _low_rank_updates(net, rank, seed=20):
  """Give every _DenseDelta site an update of exactly ``rank`` plus a bias update."""
  rng = np.random.default_rng(seed)
  for _, adapter in adapter_sites(net):
    fan_in, fan_out = adapter.view.fan_in, adapter.view.fan_out
    u, v = rng.standard_normal((fan_in, rank)), rng.standard_normal((rank, fan_out))
    adapter.update[...] = jnp.asarray(0.2 * u @ v, jnp.float32)
    adapter.bias_update[...] = jnp.asarray(rng.standard_normal(fan_out), jnp.float32)


def test_other_methods_export_as_the_closest_low_rank_lora(tmp_path):
  torch_net, net = _twins(seed=14)
  lrj.attach(net, [(r"layers/\d/(query|value)|out", _DenseDeltaSpec())], rngs=nnx.Rngs(0))
  _low_rank_updates(net, rank=2)
  with pytest.raises(lrj_io.PeftFormatError, match="approximate_rank"):
    lrj_io.export_peft(net, str(tmp_path / "refused"))
  x = _x(seed=15)
  ours = np.asarray(net(jnp.asarray(x)))

  # An update of rank 2 is held exactly by rank-2 LoRA factors (bias via lora_B.bias).
  errors = lrj_io.export_peft(net, str(tmp_path / "exact"), approximate_rank=2)
  assert set(errors) == {t.replace(".", "/") for t in TARGETS}
  assert max(errors.values()) < 1e-5
  _loaded_in_peft(torch_net, tmp_path / "exact", x, ours, tol=1e-4)

  # At rank 1 the file holds the best rank-1 update, and the reported error is its error.
  torch_net, _ = _twins(seed=14)
  errors = lrj_io.export_peft(net, str(tmp_path / "rank1"), approximate_rank=1)
  report = json.load(open(tmp_path / "rank1" / "approximation.json"))
  assert report["rank"] == 1 and report["relative_error"]["out"] == pytest.approx(errors["out"])
  adapter = dict(adapter_sites(net))["out"]
  delta = np.asarray(adapter.update[...], np.float64)
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  assert errors["out"] == pytest.approx(s[1] / np.sqrt(np.sum(s**2)), rel=1e-4)
  loaded = peft.PeftModel.from_pretrained(torch_net, str(tmp_path / "rank1")).double()
  merged = loaded.merge_and_unload()
  expected = np.asarray(adapter.base.kernel[...], np.float64) + s[0] * np.outer(u[:, 0], vt[0])
  np.testing.assert_allclose(merged.out.weight.detach().numpy().T, expected, atol=1e-5)


def test_approximate_export_refuses_replaced_base_kernels_and_mixed_inits(tmp_path):
  _, net = _twins()
  lrj.attach(net, [("out", _DenseDeltaSpec()), (r"layers/0/query", lrj.adapters.lora(rank=2, init="pissa"))],
             rngs=nnx.Rngs(0))
  with pytest.raises(lrj_io.PeftFormatError, match="init_lora_weights='pissa'"):
    lrj_io.export_peft(net, str(tmp_path), approximate_rank=2)
  with pytest.raises(lrj_io.PeftFormatError, match="positive integer"):
    lrj_io.export_peft(net, str(tmp_path), approximate_rank=0)

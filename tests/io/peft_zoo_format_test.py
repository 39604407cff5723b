"""The PEFT file formats beyond LoRA: LoHa, LoKr, VeRA, HRA, FourierFT, OFT, BOFT, MiSS/Bat, AdaLoRA, HUT.

On the torch / NNX twin network of peft_parity_test.py: our randomized adapter
exported with export_peft loads with peft.PeftModel.from_pretrained and gives
our outputs (and merge_and_unload gives our merged kernels); a randomized PEFT
adapter saved by peft and read with import_peft gives PEFT's outputs.
"""

from __future__ import annotations

import json

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
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import peft_parity_test as twin  # pylint: disable=g-import-not-at-top,wrong-import-position


class _BlockDiagonalExtension:
  """Stands in for PEFT's fbd_cuda extension, so that BOFT keeps m > 1 on CPU."""

  @staticmethod
  def forward(blocks):
    return [torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])]


def _boft_extension(monkeypatch):
  from peft.tuners.boft import layer as boft_layer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiagonalExtension)


EXPORT_CASES = [
    ("loha", dict(rank=3, alpha=5.0)),
    ("loha", dict(rank=2)),  # alpha None: PEFT alpha = r
    ("lokr", dict(rank=1, alpha=3.0, decompose_both=True)),  # C and M both factored
    ("lokr", dict(rank=8, alpha=2.0)),  # M stored full
    ("lokr", dict(rank=2, decompose_factor=2)),
    ("vera", dict(rank=4, projection_seed=3, d_initial=0.2)),
    ("vera", dict(rank=3, basis_shape=(16, 14))),  # a basis larger than the layers
    ("hra", dict(rank=4)),
    ("oft", dict(block_size=2)),  # exact Cayley
    ("oft", dict(num_blocks=2, cayley_neumann_order=3)),  # Neumann series, blocks of 6 and 5
    ("boft", dict(butterfly_factors=1, block_size=2)),
    ("boft", dict(butterfly_factors=1, num_blocks=2)),
    ("miss", dict(rank=4)),
    ("miss", dict(rank=5, mini_r=2)),  # 12 = 5 + 5 + 2: a partial last chunk
    ("bat", dict(rank=2)),
    ("adalora", dict(rank=3, alpha=5.0)),
    ("hut", dict(rank=3, alpha=5.0)),  # PEFT's HIRA has no scale: s = 5 / 3 folded into hira_B
    ("hut", dict(rank=2)),
]


def _layer(root, dotted):
  for part in dotted.split("."):
    root = root[int(part)] if part.isdigit() else getattr(root, part)
  return root


@pytest.mark.parametrize("method,hp", EXPORT_CASES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(EXPORT_CASES)])
def test_export_loads_in_peft_with_same_outputs_and_merge(method, hp, tmp_path, monkeypatch):
  _boft_extension(monkeypatch)
  torch_net, net = twin._twins()
  twin._attach(net, method, **hp)
  randomize_adapters(net, 2, 0.3)
  x = twin._x()
  ours = np.asarray(net(jnp.asarray(x)))
  assert lrj_io.export_peft(net, str(tmp_path)) == {}
  config = json.load(open(tmp_path / "adapter_config.json"))
  assert config["peft_type"] == {"bat": "MISS", "hut": "HIRA"}.get(method, method.upper())
  merged_torch = twin._loaded_in_peft(torch_net, tmp_path, x, ours).merge_and_unload()
  lrj.merge(net)
  for name in twin.TARGETS:
    np.testing.assert_allclose(np.asarray(_layer(net, name).kernel[...]).T,
                               _layer(merged_torch, name).weight.detach().numpy(),
                               rtol=1e-5, atol=1e-5, err_msg=name)


IMPORT_CASES = [
    ("loha", lambda t: peft.LoHaConfig(r=3, alpha=5, target_modules=t), "hada_"),
    ("lokr", lambda t: peft.LoKrConfig(r=1, alpha=3, decompose_both=True, target_modules=t), "lokr_"),
    ("lokr", lambda t: peft.LoKrConfig(r=2, alpha=4, decompose_factor=2, target_modules=t), "lokr_"),
    ("vera", lambda t: peft.VeraConfig(r=4, projection_prng_key=7, target_modules=t),
     "vera_lambda"),
    ("hra", lambda t: peft.HRAConfig(r=4, target_modules=t), "hra_u"),
    ("oft", lambda t: peft.OFTConfig(r=0, oft_block_size=2, target_modules=t), "oft_R"),
    ("oft", lambda t: peft.OFTConfig(r=0, oft_block_size=5, use_cayley_neumann=False,
                                     target_modules=["layers.1.query", "out"]), "oft_R"),
    ("boft", lambda t: peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2,  # fan_in 12
                                       target_modules=["layers.0.query", "layers.0.value"]),
     "boft_"),
    ("fourierft", lambda t: peft.FourierFTConfig(n_frequency=9, scaling=30.0, random_loc_seed=5,
                                                 target_modules=t), "fourierft_spectrum"),
    ("miss", lambda t: peft.MissConfig(r=4, target_modules=t), "miss_block"),
    ("miss", lambda t: peft.MissConfig(r=4, mini_r=2, init_weights="mini", target_modules=t),
     "miss_block"),
    ("bat", lambda t: peft.MissConfig(r=2, init_weights="bat", target_modules=t), "miss_block"),
    ("adalora", lambda t: peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=5, total_step=10,
                                             target_modules=t), "lora_"),
    ("hut", lambda t: peft.HiraConfig(r=3, target_modules=t), "hira_"),
]


@pytest.mark.parametrize("method,config,trained", IMPORT_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(IMPORT_CASES)])
def test_import_of_a_peft_adapter_gives_peft_outputs(method, config, trained, tmp_path,
                                                     monkeypatch):
  _boft_extension(monkeypatch)
  torch_net, net = twin._twins(seed=3)
  model = peft.get_peft_model(torch_net, config(twin.TARGETS)).double()
  twin._perturb_trained(model, trained)
  model.eval()
  x = twin._x(seed=5)
  expected = twin._torch_out(model, x)
  model.save_pretrained(str(tmp_path))
  lrj_io.import_peft(str(tmp_path), net)
  assert {type(a.spec) for _, a in adapter_sites(net)} == {type(lrj.adapters.get(method))}
  np.testing.assert_allclose(np.asarray(net(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_boft_with_two_butterfly_factors_exports_to_peft(tmp_path, monkeypatch):
  _boft_extension(monkeypatch)
  torch_net, net = twin._twins()
  lrj.attach(net, [(r"layers/0/(query|value)", lrj.adapters.boft(butterfly_factors=2, block_size=2))],
             rngs=nnx.Rngs(0))
  randomize_adapters(net, 2, 0.3)
  x = twin._x()
  lrj_io.export_peft(net, str(tmp_path))
  twin._loaded_in_peft(torch_net, tmp_path, x, np.asarray(net(jnp.asarray(x))))


def _round_trip(tmp_path, method, **hp):
  """(ours, back): randomized ``method`` adapters and their export imported into a fresh twin,
  checked to give the same outputs."""
  _, net = twin._twins()
  twin._attach(net, method, **hp)
  randomize_adapters(net, 2, 0.3)
  lrj_io.export_peft(net, str(tmp_path))
  _, fresh = twin._twins()
  lrj_io.import_peft(str(tmp_path), fresh)
  x = jnp.asarray(twin._x())
  np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(net(x)), rtol=1e-6, atol=1e-6)
  return net, fresh


def test_round_trip_through_the_file_keeps_every_leaf(tmp_path):
  _, fresh = _round_trip(tmp_path, "vera", rank=4)
  assert fresh.out.vera_a is fresh.layers[0].query.vera_a  # one shared basis again


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_hut_round_trip_through_the_peft_file(alpha, tmp_path):
  net, fresh = _round_trip(tmp_path, "hut", rank=3, alpha=alpha)
  for (path, ours), (_, back) in zip(adapter_sites(net), adapter_sites(fresh)):
    assert back.spec == lrj.adapters.hut(rank=3), path  # PEFT's HiRA is HUT at alpha = r
    np.testing.assert_array_equal(back.hut_a[...], ours.hut_a[...], err_msg=path)
    np.testing.assert_allclose(back.hut_b[...], ours.spec.scale * ours.hut_b[...], rtol=1e-6,
                               err_msg=path)
    if alpha is None:
      np.testing.assert_array_equal(back.hut_b[...], ours.hut_b[...], err_msg=path)


def test_fourierft_from_peft_exports_back_exactly_and_native_locations_are_refused(tmp_path):
  torch_net, net = twin._twins(seed=3)
  config = peft.FourierFTConfig(n_frequency=9, scaling=30.0, random_loc_seed=5,
                                target_modules=twin.TARGETS)
  model = peft.get_peft_model(torch_net, config).double()
  model.save_pretrained(str(tmp_path / "theirs"))  # init_weights=False: random spectrum
  lrj_io.import_peft(str(tmp_path / "theirs"), net)
  randomize_adapters(net, 6, 0.3)  # train ours further, then send it back to PEFT
  lrj_io.export_peft(net, str(tmp_path / "ours"))
  fresh_torch, _ = twin._twins(seed=3)
  x = twin._x(seed=7)
  twin._loaded_in_peft(fresh_torch, tmp_path / "ours", x, np.asarray(net(jnp.asarray(x))))

  _, native = twin._twins()
  twin._attach(native, "fourierft", n_frequency=9, seed=5)
  with pytest.raises(lrj_io.PeftFormatError, match="redraws them with torch.randperm"):
    lrj_io.export_peft(native, str(tmp_path / "native"))


# -- bad input ---------------------------------------------------------------------


def _exported(tmp_path, method="loha", **hp):
  _, net = twin._twins()
  twin._attach(net, method, **(hp or dict(rank=2)))
  lrj_io.export_peft(net, str(tmp_path))
  return tmp_path


def _edit_tensors(path, edit):
  file = str(path / "adapter_model.safetensors")
  tensors = safetensors_numpy.load_file(file)
  edit(tensors)
  safetensors_numpy.save_file(tensors, file)


def test_a_file_for_another_base_names_key_and_shapes(tmp_path):
  path = _exported(tmp_path)
  key = "base_model.model.out.hada_w1_a"
  _edit_tensors(path, lambda t: t.__setitem__(key, np.zeros((twin.D_OUT + 1, 2), np.float32)))
  _, net = twin._twins()
  with pytest.raises(lrj_io.PeftFormatError,
                     match=rf"'{key}' has shape \(7, 2\) but the model wants \(6, 2\) for layer 'out\'"):
    lrj_io.import_peft(str(path), net)
  assert twin._no_adapters(net)


def test_a_hira_file_for_another_base_names_key_and_shapes(tmp_path):
  path = _exported(tmp_path, "hut", rank=2)
  key = "base_model.model.layers.0.query.hira_A"
  _edit_tensors(path, lambda t: t.__setitem__(key, np.zeros((2, twin.D_IN + 1), np.float32)))
  _, net = twin._twins()
  with pytest.raises(lrj_io.PeftFormatError,
                     match=rf"'{key}' has shape \(2, 13\) but the model wants \(2, 12\) for layer "
                     r"'layers/0/query'"):
    lrj_io.import_peft(str(path), net)
  assert twin._no_adapters(net)


def test_vera_shared_projection_mismatch_and_missing_tensor(tmp_path):
  path = _exported(tmp_path / "vera", "vera", rank=3)
  _edit_tensors(path, lambda t: t.__setitem__("base_model.vera_A", np.zeros((3, 13), np.float32)))
  _, net = twin._twins()
  with pytest.raises(lrj_io.PeftFormatError, match=r"'base_model.vera_A' has shape \(3, 13\).*wants \(3, 12\)"):
    lrj_io.import_peft(str(path), net)
  assert twin._no_adapters(net)

  path = _exported(tmp_path / "lokr", "lokr", rank=1)
  _edit_tensors(path, lambda t: t.pop("base_model.model.layers.1.value.lokr_w2_a"))
  with pytest.raises(lrj_io.PeftFormatError,
                     match=r"lacks 'base_model.model.layers.1.value.lokr_w2_a'"):
    lrj_io.import_peft(str(path), net)
  assert twin._no_adapters(net)


def test_peft_options_we_do_not_implement_are_refused(tmp_path):
  path = _exported(tmp_path / "hra", "hra", rank=2)
  config = json.load(open(path / "adapter_config.json"))
  config["r"] = 3
  json.dump(config, open(path / "adapter_config.json", "w"))
  _, net = twin._twins()
  with pytest.raises(lrj_io.PeftFormatError, match="HRA config is not supported here.*even"):
    lrj_io.import_peft(str(path), net)

  path = _exported(tmp_path / "adalora", "adalora", rank=2)
  config = json.load(open(path / "adapter_config.json"))
  config["rank_pattern"] = {"out": [True, False]}
  json.dump(config, open(path / "adapter_config.json", "w"))
  with pytest.raises(lrj_io.PeftFormatError, match="rank_pattern entry 'out': expected '<module>.lora_E'"):
    lrj_io.import_peft(str(path), net)
  assert twin._no_adapters(net)

  path = _exported(tmp_path)
  config = json.load(open(path / "adapter_config.json"))
  config["rank_dropout"] = 0.1
  json.dump(config, open(path / "adapter_config.json", "w"))
  _, net = twin._twins()
  with pytest.raises(lrj_io.PeftFormatError, match=r"LOHA options \{'rank_dropout': 0.1\}"):
    lrj_io.import_peft(str(path), net)
  assert twin._no_adapters(net)

  for option, value in (("hira_dropout", 0.1), ("rank_pattern", {"out": 4})):
    path = _exported(tmp_path / option, "hut", rank=2)
    config = json.load(open(path / "adapter_config.json"))
    config[option] = value
    json.dump(config, open(path / "adapter_config.json", "w"))
    with pytest.raises(lrj_io.PeftFormatError, match=rf"HIRA options \{{'{option}': "):
      lrj_io.import_peft(str(path), net)
    assert twin._no_adapters(net)


def test_export_refuses_mixed_methods_mixed_specs_and_inexpressible_options(tmp_path):
  _, net = twin._twins()
  lrj.attach(net, [("out", lrj.adapters.loha(rank=2)), (r"layers/0/query", lrj.adapters.lora(rank=2))],
             rngs=nnx.Rngs(0))
  with pytest.raises(lrj_io.PeftFormatError, match=r"one method per adapter; the model mixes lora .* and loha"):
    lrj_io.export_peft(net, str(tmp_path))
  # approximate_rank writes every site as LoRA instead.
  errors = lrj_io.export_peft(net, str(tmp_path / "approx"), approximate_rank=2)
  assert set(errors) == {"out"}

  _, net = twin._twins()
  lrj.attach(net, [("out", lrj.adapters.loha(rank=2)), (r"layers/0/query", lrj.adapters.loha(rank=3))],
             rngs=nnx.Rngs(0))
  with pytest.raises(lrj_io.PeftFormatError, match="one LOHA config per adapter"):
    lrj_io.export_peft(net, str(tmp_path))

  _, net = twin._twins()
  twin._attach(net, "lokr", rank=2, kron_shape=(2, 2))
  with pytest.raises(lrj_io.PeftFormatError, match=r"kron_shape=\(2, 2\) has no PEFT equivalent"):
    lrj_io.export_peft(net, str(tmp_path))

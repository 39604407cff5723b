"""Numerical parity of VeRA, LoHa, LoKr, OFT, BOFT and HRA with PEFT + torch.

Two torch nn.Linear layers of different shapes and their nnx.Linear twins
share weights; PEFT's adapter weights are set to random values, copied into
our adapters with the layout mapping of each method's docstring, and the
outputs (and PEFT's delta weights where PEFT has them) must agree.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import linalg

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SHAPES = {"first": (12, 20), "second": (8, 6)}  # (in, out); VeRA needs a basis of (12, 20)


class TorchPair(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.first = torch.nn.Linear(*SHAPES["first"])
    self.second = torch.nn.Linear(*SHAPES["second"])


class Pair(nnx.Module):
  """The NNX twin: same layer names, weights copied from the torch pair."""

  def __init__(self, torch_pair):
    rngs = nnx.Rngs(0)
    for name, (d_in, d_out) in SHAPES.items():
      layer = nnx.Linear(d_in, d_out, rngs=rngs)
      source = getattr(torch_pair, name)
      layer.kernel[...] = jnp.asarray(source.weight.detach().numpy().T)
      layer.bias[...] = jnp.asarray(source.bias.detach().numpy())
      setattr(self, name, layer)


def _setup(config, spec, seed=0):
  """A PEFT-wrapped torch pair, its NNX twin with ``spec`` attached, and inputs."""
  torch.manual_seed(seed)
  torch_pair = TorchPair()
  model = Pair(torch_pair)
  peft_model = peft.get_peft_model(torch_pair, config)
  peft_model.eval()
  lrj.attach(model, [("first|second", spec)], rngs=nnx.Rngs(1))
  x = np.random.default_rng(seed).normal(size=(2, 3, 12)).astype(np.float32)
  return peft_model.base_model.model, model, x


def _randomize(parameters, generator_seed, scale=0.3, offset=0.0):
  gen = torch.Generator().manual_seed(generator_seed)
  with torch.no_grad():
    for p in parameters:
      p.copy_(offset + scale * torch.randn(p.shape, generator=gen))


def _t(tensor):
  """torch tensor -> numpy float32."""
  return tensor.detach().numpy().astype(np.float32)


def _check_outputs(torch_layers, model, x, rtol=1e-5, atol=1e-5):
  for name, (d_in, _) in SHAPES.items():
    xs = x[..., :d_in]
    with torch.no_grad():
      expected = getattr(torch_layers, name)(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(getattr(model, name)(jnp.asarray(xs)), expected, rtol=rtol,
                               atol=atol, err_msg=name)


def test_vera_matches_peft_with_a_basis_sliced_per_layer():
  config = peft.VeraConfig(r=6, target_modules=["first", "second"], projection_prng_key=3)
  torch_layers, model, x = _setup(config, lrj.adapters.vera(rank=6))
  for i, name in enumerate(SHAPES):
    layer = getattr(torch_layers, name)
    _randomize([layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]], i)
  peft_a = _t(torch_layers.first.vera_A["default"])  # (r, in_max), shared by both layers
  peft_b = _t(torch_layers.first.vera_B["default"])  # (out_max, r)
  assert peft_a.shape == (6, 12) and peft_b.shape == (20, 6)
  model.first.vera_a[...] = jnp.asarray(peft_a.T)  # one shared variable: sets both layers
  model.first.vera_bmat[...] = jnp.asarray(peft_b.T)
  for name in SHAPES:
    layer, ours = getattr(torch_layers, name), getattr(model, name)
    ours.vera_d[...] = jnp.asarray(_t(layer.vera_lambda_d["default"]))
    ours.vera_b[...] = jnp.asarray(_t(layer.vera_lambda_b["default"]))
    np.testing.assert_allclose(ours.delta().T, _t(layer.get_delta_weight("default")),
                               rtol=1e-5, atol=1e-6)
  assert model.second.vera_a is model.first.vera_a
  _check_outputs(torch_layers, model, x)


def test_loha_matches_peft():
  config = peft.LoHaConfig(r=3, alpha=5, target_modules=["first", "second"])
  torch_layers, model, x = _setup(config, lrj.adapters.loha(rank=3, alpha=5))
  for i, name in enumerate(SHAPES):
    layer, ours = getattr(torch_layers, name), getattr(model, name)
    names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    _randomize([getattr(layer, n)["default"] for n in names], i)
    get = lambda n: jnp.asarray(_t(getattr(layer, n)["default"]).T)
    ours.loha_b1[...], ours.loha_a1[...] = get("hada_w1_a"), get("hada_w1_b")
    ours.loha_b2[...], ours.loha_a2[...] = get("hada_w2_a"), get("hada_w2_b")
    np.testing.assert_allclose(ours.delta().T, _t(layer.get_delta_weight("default")),
                               rtol=1e-5, atol=1e-6)
  _check_outputs(torch_layers, model, x)


@pytest.mark.parametrize("rank,decompose_both,decompose_factor", [
    (8, False, -1),  # M stored full (r >= max(M dims) / 2)
    (1, False, -1),  # M = M_a M_b
    (1, True, -1),  # C = C_a C_b too
    (2, False, 2),  # PEFT's decompose_factor
])
def test_lokr_matches_peft(rank, decompose_both, decompose_factor):
  config = peft.LoKrConfig(r=rank, alpha=3, target_modules=["first", "second"],
                           decompose_both=decompose_both, decompose_factor=decompose_factor)
  spec = lrj.adapters.lokr(rank=rank, alpha=3, decompose_both=decompose_both,
                           decompose_factor=decompose_factor)
  torch_layers, model, x = _setup(config, spec)
  ours_to_peft = {"c": "lokr_w1", "c_a": "lokr_w1_b", "c_b": "lokr_w1_a",
                  "m": "lokr_w2", "m_a": "lokr_w2_b", "m_b": "lokr_w2_a"}
  for i, name in enumerate(SHAPES):
    layer, ours = getattr(torch_layers, name), getattr(model, name)
    present = {k: v for k, v in ours_to_peft.items() if hasattr(ours, f"lokr_{k}")}
    assert set(present.values()) == {n for n in ours_to_peft.values()
                                     if "default" in getattr(layer, n)}
    _randomize([getattr(layer, n)["default"] for n in present.values()], i)
    for ours_name, peft_name in present.items():
      value = _t(getattr(layer, peft_name)["default"]).T
      assert getattr(ours, f"lokr_{ours_name}").shape == value.shape
      getattr(ours, f"lokr_{ours_name}")[...] = jnp.asarray(value)
    np.testing.assert_allclose(ours.delta().T, _t(layer.get_delta_weight("default")),
                               rtol=1e-5, atol=1e-6)
  _check_outputs(torch_layers, model, x)


@pytest.mark.parametrize("neumann_terms", [None, 5])
def test_oft_matches_peft(neumann_terms):
  config = peft.OFTConfig(r=0, oft_block_size=4, target_modules=["first", "second"],
                          use_cayley_neumann=neumann_terms is not None,
                          num_cayley_neumann_terms=neumann_terms or 5)
  order = 0 if neumann_terms is None else neumann_terms - 2
  torch_layers, model, x = _setup(config, lrj.adapters.oft(block_size=4,
                                                           cayley_neumann_order=order))
  for i, name in enumerate(SHAPES):
    layer, ours = getattr(torch_layers, name), getattr(model, name)
    weight = layer.oft_R["default"].weight
    _randomize([weight], i, scale=0.1)
    sign = 1.0 if neumann_terms else -1.0  # PEFT's exact branch is cayley(-Q)
    ours.oft_q[...] = jnp.asarray(sign * _t(weight))
  _check_outputs(torch_layers, model, x)


class _BlockDiagonalExtension:
  """Stands in for PEFT's fbd_cuda extension, so that BOFT keeps m > 1 on CPU."""

  @staticmethod
  def forward(blocks):
    return [torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])]


@pytest.mark.parametrize("block_size,factors", [(2, 2), (4, 1)])
def test_boft_matches_peft(monkeypatch, block_size, factors):
  from peft.tuners.boft import layer as boft_layer
  monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiagonalExtension)
  config = peft.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factors,
                           target_modules=["first", "second"])
  spec = lrj.adapters.boft(block_size=block_size, butterfly_factors=factors)
  torch_layers, model, x = _setup(config, spec)
  for i, name in enumerate(SHAPES):
    layer, ours = getattr(torch_layers, name), getattr(model, name)
    assert layer.boft_R["default"].shape[0] == factors
    _randomize([layer.boft_R["default"]], i, scale=0.2)
    _randomize([layer.boft_s["default"]], i + 10, scale=0.1, offset=1.0)
    r = _t(layer.boft_R["default"])
    skew = 0.5 * (r - np.swapaxes(r, -1, -2))
    ours.boft_q[...] = -linalg.skew_to_vector(jnp.asarray(skew))  # PEFT: cayley(-S)
    ours.boft_scale[...] = jnp.asarray(_t(layer.boft_s["default"])[:, 0])
    rotation, _ = layer.get_delta_weight("default")
    np.testing.assert_allclose(ours.rotation(), _t(rotation), rtol=1e-5, atol=1e-5)
  _check_outputs(torch_layers, model, x)


def test_hra_matches_peft():
  config = peft.HRAConfig(r=4, target_modules=["first", "second"])
  torch_layers, model, x = _setup(config, lrj.adapters.hra(rank=4))
  for i, name in enumerate(SHAPES):
    layer, ours = getattr(torch_layers, name), getattr(model, name)
    _randomize([layer.hra_u["default"]], i)
    ours.hra_u[...] = jnp.asarray(_t(layer.hra_u["default"]))
    # PEFT's H (in, in) with W = W0 H in (out, in); ours rotates by H^T.
    np.testing.assert_allclose(ours.rotation(), _t(layer.get_delta_weight("default")).T,
                               rtol=1e-5, atol=1e-5)
  _check_outputs(torch_layers, model, x)


def test_peft_inits_keep_the_identity_like_ours():
  """At init both libraries leave the layers unchanged (LoKr/LoHa/VeRA/OFT/BOFT/HRA)."""
  configs = [
      (peft.LoHaConfig(r=2, target_modules=["first", "second"]), lrj.adapters.loha(rank=2)),
      (peft.LoKrConfig(r=2, target_modules=["first", "second"]), lrj.adapters.lokr(rank=2)),
      (peft.HRAConfig(r=2, target_modules=["first", "second"]), lrj.adapters.hra(rank=2)),
  ]
  for config, spec in configs:
    torch_layers, model, x = _setup(config, spec)
    _check_outputs(torch_layers, model, x)

"""Math of the high-rank and square adapters: MoRA, MiSS (Bone), Bat, HUT.

MiSS and Bat are matched numerically against HF PEFT's ``miss`` tuner on the
same weights; MoRA against an entry-by-entry transcription of the paper's
operators (Eq. 6 and Eq. 9) written with explicit loops; HUT against its
formula and against HF PEFT's ``hira`` tuner, whose formula it shares.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj

from lrj_testing import Host


def _linear(fan_in, fan_out, seed=0):
  model = Host(nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed)))
  model.layer.bias[...] = jax.random.normal(jax.random.key(seed + 1), (fan_out,))
  return model


def _set(param, seed, scale=0.5):
  param[...] = scale * jax.random.normal(jax.random.key(seed), param.shape, param.dtype)


# -- MoRA -------------------------------------------------------------------------------------
def _mora_reference(x, m, fan_out, variant):
  """dy for one input vector, by the paper's definitions, entry by entry."""
  fan_in, size = len(x), m.shape[0]
  chunks = -(-fan_in // size)
  padded = [x[p % fan_in] for p in range(chunks * size)]  # wrap around, as the official code
  if variant == "sharing":
    z = [sum(padded[b * size + k] for b in range(chunks)) for k in range(size)]
    out = np.asarray(z) @ m
  else:
    half = size // 2
    rows = []
    for b in range(chunks):
      v = padded[b * size:(b + 1) * size]
      rotated = []
      for j in range(size):
        angle = b / 10000.0 ** (2 * (j % half) / size)
        partner = -v[j + half] if j < half else v[j - half]
        rotated.append(v[j] * math.cos(angle) + partner * math.sin(angle))
      rows.append(np.asarray(rotated) @ m)
    out = np.concatenate(rows)
  return np.asarray([out[o % len(out)] for o in range(fan_out)])


@pytest.mark.parametrize("variant", ["sharing", "rope"])
@pytest.mark.parametrize("fan_in,fan_out", [(13, 11), (6, 20)])
def test_mora_matches_the_paper_operators(variant, fan_in, fan_out):
  model = _linear(fan_in, fan_out)
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, fan_in)))
  y_base = np.asarray(model(x))
  lrj.attach(model, [("layer", lrj.adapters.mora(rank=2, variant=variant))], rngs=nnx.Rngs(0))
  adapter = model.layer
  np.testing.assert_array_equal(model(x), y_base)  # M = 0 at init
  _set(adapter.mora_m, 3)
  m = np.asarray(adapter.mora_m[...], np.float64)
  expected = y_base + np.stack([_mora_reference(row, m, fan_out, variant) for row in x])
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x @ np.asarray(adapter.delta_matrix()), expected - y_base,
                             rtol=1e-5, atol=1e-5)


def test_mora_square_size_and_parameter_budget():
  spec = lrj.adapters.mora(rank=8)
  assert spec.square_size(4096, 4096) == 256  # the paper's example
  assert spec.num_params(4096, 4096) == 256**2 == 8 * (4096 + 4096)
  assert spec.square_size(12, 10) == round(math.sqrt(22 * 8))
  assert lrj.adapters.mora(rank=8, variant="rope").square_size(12, 10) % 2 == 0


@pytest.mark.parametrize("variant", ["sharing", "rope"])
def test_mora_update_rank_exceeds_r(variant):
  model = _linear(32, 32)
  r = 2
  lrj.attach(model, [("layer", lrj.adapters.mora(rank=r, variant=variant))], rngs=nnx.Rngs(0))
  _set(model.layer.mora_m, 4)
  size = model.layer.mora_m.shape[0]
  rank = int(np.linalg.matrix_rank(np.asarray(model.layer.delta_matrix(), np.float64), tol=1e-4))
  assert rank > r
  if variant == "sharing":
    assert rank == size  # C M D with C, D of full rank r_hat
  else:
    assert rank > size  # the rotations make the chunks' images differ


# -- MiSS / Bat / HUT against PEFT -----------------------------------------------------------
def _peft_layer(kernel, bias, tuner="MissConfig", **config):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")

  class Net(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.layer = torch.nn.Linear(kernel.shape[0], kernel.shape[1])

    def forward(self, x):
      return self.layer(x)

  net = Net()
  with torch.no_grad():
    net.layer.weight.copy_(torch.from_numpy(np.asarray(kernel).T.copy()))
    net.layer.bias.copy_(torch.from_numpy(np.asarray(bias).copy()))
  tuner_config = getattr(peft, tuner)(target_modules=["layer"], **config)
  return peft.get_peft_model(net, tuner_config), torch


def _assert_matches_peft(model, peft_model, torch, key):
  """Our layer's forward on random inputs and its merged kernel equal the PEFT layer's."""
  x = np.asarray(jax.random.normal(key, (4, model.layer.view.fan_in)))
  with torch.no_grad():
    expected = peft_model(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
  merged = peft_model.merge_and_unload().layer.weight.detach().numpy().T
  np.testing.assert_allclose(model.layer.effective_kernel(), merged, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fan_in,rank,mini_r", [(13, 4, None), (12, 4, None), (13, 3, 4)])
def test_miss_matches_peft(fan_in, rank, mini_r):
  fan_out = 12
  model = _linear(fan_in, fan_out)
  kernel, bias = np.asarray(model.layer.kernel[...]), np.asarray(model.layer.bias[...])
  lrj.attach(model, [("layer", lrj.adapters.miss(rank=rank, mini_r=mini_r))], rngs=nnx.Rngs(0))
  _set(model.layer.miss_block, 5)
  block = np.asarray(model.layer.miss_block[...])
  config = dict(r=rank, init_weights=True) if mini_r is None else dict(r=rank, init_weights="mini",
                                                                        mini_r=mini_r)
  peft_model, torch = _peft_layer(kernel, bias, **config)
  layer = peft_model.base_model.model.layer
  with torch.no_grad():
    layer.miss_block["default"].copy_(torch.from_numpy(block.copy()))
  _assert_matches_peft(model, peft_model, torch, jax.random.key(6))


def test_bat_matches_peft_and_its_block_formula():
  fan_in, fan_out, r = 12, 8, 4
  model = _linear(fan_in, fan_out)
  kernel, bias = np.asarray(model.layer.kernel[...]), np.asarray(model.layer.bias[...])
  lrj.attach(model, [("layer", lrj.adapters.bat(rank=r))], rngs=nnx.Rngs(0))
  _set(model.layer.bat_blocks, 7)
  blocks = np.asarray(model.layer.bat_blocks[...], np.float64)
  # W'_ij = W_ij (I + B_i) + B_i on r x r blocks of the (out, in) weight.
  w = kernel.T.astype(np.float64)
  expected = w.copy()
  for i in range(fan_out // r):
    for j in range(fan_in // r):
      w_ij = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
      expected[i * r:(i + 1) * r, j * r:(j + 1) * r] = w_ij @ (np.eye(r) + blocks[i]) + blocks[i]
  np.testing.assert_allclose(model.layer.effective_kernel(), expected.T, rtol=1e-5, atol=1e-5)
  peft_model, torch = _peft_layer(kernel, bias, r=r, init_weights="bat")
  layer = peft_model.base_model.model.layer
  with torch.no_grad():
    layer.miss_block["default"].copy_(torch.from_numpy(blocks.astype(np.float32)))
  _assert_matches_peft(model, peft_model, torch, jax.random.key(8))


def test_miss_update_is_one_shared_block():
  model = _linear(10, 6)
  lrj.attach(model, [("layer", lrj.adapters.miss(rank=4))], rngs=nnx.Rngs(0))
  _set(model.layer.miss_block, 9)
  delta, block = np.asarray(model.layer.delta_matrix()), np.asarray(model.layer.miss_block[...])
  for i in range(10):
    np.testing.assert_array_equal(delta[i], block[i % 4])


# -- HUT -------------------------------------------------------------------------------------
def test_hut_is_a_hadamard_modulation_of_w0_of_rank_above_r():
  model = _linear(16, 12)
  w0 = np.asarray(model.layer.kernel[...], np.float64)
  spec = lrj.adapters.hut(rank=2, alpha=4.0)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.layer.effective_kernel(), w0.astype(np.float32))
  _set(model.layer.hut_b, 10)
  a = np.asarray(model.layer.hut_a[...], np.float64)
  b = np.asarray(model.layer.hut_b[...], np.float64)
  expected = w0 * (1.0 + spec.scale * a @ b)
  np.testing.assert_allclose(model.layer.effective_kernel(), expected, rtol=1e-5, atol=1e-6)
  assert spec.scale == 2.0
  assert np.linalg.matrix_rank(expected - w0, tol=1e-6) > 2


def test_hut_matches_peft_hira_on_the_same_weights():
  # PEFT's HiRA: W' = W0 + W0 ⊙ (B A) on the (out, in) weight, no scale; HUT at alpha = r.
  fan_in, fan_out, r = 10, 6, 3
  model = _linear(fan_in, fan_out)
  kernel, bias = np.asarray(model.layer.kernel[...]), np.asarray(model.layer.bias[...])
  lrj.attach(model, [("layer", lrj.adapters.hut(rank=r))], rngs=nnx.Rngs(0))
  assert np.abs(np.asarray(model.layer.hut_a[...])).max() <= 1 / math.sqrt(fan_in)
  _set(model.layer.hut_a, 11)
  _set(model.layer.hut_b, 12)
  a, b = np.asarray(model.layer.hut_a[...]), np.asarray(model.layer.hut_b[...])
  peft_model, torch = _peft_layer(kernel, bias, tuner="HiraConfig", r=r)
  layer = peft_model.base_model.model.layer
  with torch.no_grad():
    layer.hira_A["default"].copy_(torch.from_numpy(a.T.copy()))  # (r, in)
    layer.hira_B["default"].copy_(torch.from_numpy(b.T.copy()))  # (out, r)
  _assert_matches_peft(model, peft_model, torch, jax.random.key(13))


# -- bad input -------------------------------------------------------------------------------
def test_bat_block_size_must_divide_both_dims():
  with pytest.raises(ValueError, match=r"bat at 'layer'.*rank=4 must divide fan_in=10 and fan_out=8"):
    lrj.attach(_linear(10, 8), [("layer", lrj.adapters.bat(rank=4))], rngs=nnx.Rngs(0))
  model = _linear(10, 8)
  lrj.attach(model, [("layer", lrj.adapters.bat())], rngs=nnx.Rngs(0))
  assert model.layer.bat_blocks.shape == (4, 2, 2)  # default: largest common divisor


def test_miss_bad_sizes():
  with pytest.raises(ValueError, match=r"mini_r=5 must divide fan_out=8"):
    lrj.attach(_linear(10, 8), [("layer", lrj.adapters.miss(rank=2, mini_r=5))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"rank=12 exceeds fan_in=10"):
    lrj.attach(_linear(10, 8), [("layer", lrj.adapters.miss(rank=12))], rngs=nnx.Rngs(0))


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match=r"variant must be one of \('sharing', 'rope'\)"):
    lrj.adapters.mora(variant="shared")
  for make in (lrj.adapters.mora, lrj.adapters.miss, lrj.adapters.bat, lrj.adapters.hut):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
      make(rank=0)

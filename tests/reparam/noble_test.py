"""NOBLE: the branch formula, the official initialization, gradients, counts, multipliers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import noble

from lrj_testing import Host
from lrj_testing import randomize_adapters


def _leaves(layer):
  return {name: np.asarray(getattr(layer, name)[...], np.float64)
          for name in ("kernel", "down", "down_bias", "up", "freq_in", "phase_in", "mix",
                       "mix_bias", "freq_out", "phase_out") if hasattr(layer, name)}


def _reference(p, x, bias, activation):
  """The paper's y = x W + b + sigma(x W_down + b_down) W_up, written out in numpy."""
  h = x @ p["down"] + p["down_bias"]
  if activation == "cosnet":
    a = np.cos(p["freq_in"] * h + p["phase_in"])
    s = np.cos(p["freq_out"] * (a @ p["mix"] + p["mix_bias"]) + p["phase_out"])
  elif activation == "cos":
    s = np.cos(p["freq_in"] * h + p["phase_in"])
  else:
    s = np.tanh(h)
  return x @ p["kernel"] + bias + s @ p["up"]


@pytest.mark.parametrize("activation", ["cosnet", "cos", "tanh"])
def test_linear_forward_is_the_branch_formula(activation):
  base = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
  base.bias[...] = jax.random.normal(jax.random.key(1), (10,))
  model = Host(base)
  lrj.attach(model, [("layer", lrj.adapters.noble(rank=5, activation=activation))],
             rngs=nnx.Rngs(2))
  randomize_adapters(model, 3, 0.5)
  x = np.asarray(jax.random.normal(jax.random.key(4), (7, 12)), np.float64)
  expected = _reference(_leaves(model.layer), x, np.asarray(base.bias[...], np.float64), activation)
  np.testing.assert_allclose(model(jnp.asarray(x, jnp.float32)), expected, rtol=2e-5, atol=2e-5)


def test_conv_forward_is_the_branch_formula_on_flattened_patches():
  # One output position (2x2 window on a 2x2 input, VALID): the conv is x_patch @ kernel matrix.
  base = nnx.Conv(3, 6, kernel_size=(2, 2), padding="VALID", rngs=nnx.Rngs(0))
  model = Host(base)
  lrj.attach(model, [("layer", lrj.adapters.noble(rank=4))], rngs=nnx.Rngs(1))
  randomize_adapters(model, 2, 0.5)
  x = jax.random.normal(jax.random.key(3), (5, 2, 2, 3))
  p = _leaves(model.layer)
  p["kernel"] = p["kernel"].reshape(12, 6)
  expected = _reference(p, np.asarray(x, np.float64).reshape(5, 12), 0.0, "cosnet")
  np.testing.assert_allclose(model(x).reshape(5, 6), expected, rtol=2e-5, atol=2e-5)


def test_initialization_follows_the_official_code():
  fan_in, fan_out, r = 384, 256, 32
  base = nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(0))
  w_init = np.asarray(base.kernel[...])
  model = Host(base)
  lrj.attach(model, [("layer", lrj.adapters.noble(rank=r))], rngs=nnx.Rngs(1))
  layer = model.layer
  p = _leaves(layer)
  # W keeps the base init and becomes a trainable leaf; the base kernel is zeroed.
  np.testing.assert_array_equal(p["kernel"], w_init)
  assert not np.any(np.asarray(base.kernel[...]))
  # Official: W_down ~ N(0, 1/fan_in), b_down = 0, W_up ~ N(0, (0.01/sqrt(r))^2),
  # M ~ N(0, (0.5/sqrt(r))^2), c ~ U(+-1/sqrt(r)), w ~ U(0.8, 1.2), p ~ N(0, 0.1^2).
  np.testing.assert_allclose(p["down"].std(), 1 / math.sqrt(fan_in), rtol=0.03)
  np.testing.assert_allclose(p["up"].std(), 0.01 / math.sqrt(r), rtol=0.03)
  np.testing.assert_allclose(p["mix"].std(), 0.5 / math.sqrt(r), rtol=0.08)
  assert not np.any(p["down_bias"])
  assert np.all(np.abs(p["mix_bias"]) <= 1 / math.sqrt(r))
  both_freqs = np.concatenate([p["freq_in"], p["freq_out"]])
  assert np.all((both_freqs >= 0.8) & (both_freqs <= 1.2)) and both_freqs.std() > 0.05
  assert not np.allclose(p["freq_in"], p["freq_out"])  # two independent cosine layers
  both_phases = np.concatenate([p["phase_in"], p["phase_out"]])
  np.testing.assert_allclose(both_phases.std(), 0.1, rtol=0.25)


def test_linear_init_scale_redraws_w_as_the_official_code():
  model = Host(nnx.Linear(512, 128, rngs=nnx.Rngs(0)))
  lrj.attach(model, [("layer", lrj.adapters.noble(rank=8, linear_init_scale=0.5))],
             rngs=nnx.Rngs(1))
  np.testing.assert_allclose(np.asarray(model.layer.kernel[...]).std(), 0.5 / math.sqrt(512),
                             rtol=0.02)


def test_zero_up_init_is_the_base_layer_and_default_is_a_small_branch():
  base = nnx.Linear(16, 12, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (6, 16))
  y_base = base(x)
  exact = Host(nnx.clone(base))
  lrj.attach(exact, [("layer", lrj.adapters.noble(rank=4, up_init_scale=0.0))], rngs=nnx.Rngs(2))
  np.testing.assert_allclose(exact(x), y_base, rtol=1e-6, atol=1e-6)
  default = Host(nnx.clone(base))
  lrj.attach(default, [("layer", lrj.adapters.noble(rank=4))], rngs=nnx.Rngs(2))
  gap = float(jnp.abs(default(x) - y_base).max())
  assert 0 < gap < 0.05 * float(jnp.abs(y_base).max())


def test_gradients_reach_every_leaf_of_the_branch():
  model = Host(nnx.Linear(12, 10, rngs=nnx.Rngs(0)))
  lrj.attach(model, [("layer", lrj.adapters.noble(rank=4))], rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (8, 12))
  target = jax.random.normal(jax.random.key(3), (8, 10))
  grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2),
                   argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
  names = sorted(_leaves(model.layer))
  assert names == sorted(["kernel", "down", "down_bias", "up", "freq_in", "phase_in", "mix",
                          "mix_bias", "freq_out", "phase_out"])
  for name in names:
    assert float(jnp.abs(grads["layer"][name][...]).max()) > 0, name


@pytest.mark.parametrize("activation,extra", [("cosnet", 4 * 5 + 25 + 5), ("cos", 10), ("gelu", 0)])
def test_parameter_count(activation, extra):
  fan_in, fan_out, r = 12, 10, 5
  spec = lrj.adapters.noble(rank=r, activation=activation)
  model = Host(nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(0)))
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(1))
  counted = sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(model, lrj.AdapterParam)))
  expected = fan_in * fan_out + fan_in * r + r + r * fan_out + extra
  assert counted == expected == spec.num_params(fan_in, fan_out)


def test_merge_is_refused():
  model = Host(nnx.Linear(12, 10, rngs=nnx.Rngs(0)))
  lrj.attach(model, [("layer", lrj.adapters.noble())], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="not mergeable"):
    lrj.merge(model)


def test_optimizer_scales_each_leaf_by_the_official_multiplier():
  fan_in, fan_out, r, lr = 24, 16, 4, 1e-2
  model = Host(nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(0)))
  lrj.attach(model, [("layer", lrj.adapters.noble(rank=r))], rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (8, fan_in))
  target = jax.random.normal(jax.random.key(3), (8, fan_out))
  loss = lambda m: jnp.mean((m(x) - target) ** 2)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
  before = _leaves(model.layer)
  opt = nnx.Optimizer(model, noble.optimizer(optax.sgd, lr, model), wrt=lrj.AdapterParam)
  opt.update(model, grads)
  after = _leaves(model.layer)
  ratio = min(fan_in, fan_out) / r
  expected = {"up": ratio ** 0.4, "mix": ratio ** 0.5, "freq_in": 2.0, "freq_out": 2.0,
              "phase_in": 4.0, "phase_out": 4.0, "kernel": 1.0, "down": 1.0, "down_bias": 1.0,
              "mix_bias": 1.0}
  for name, multiplier in expected.items():
    g = np.asarray(grads["layer"][name][...], np.float64)
    np.testing.assert_allclose(after[name] - before[name], -lr * multiplier * g, rtol=1e-4,
                               atol=1e-7, err_msg=name)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="rank=11 exceeds min"):
    lrj.attach(Host(nnx.Linear(12, 10, rngs=nnx.Rngs(0))), [("layer", lrj.adapters.noble(rank=11))],
               rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="activation must be one of"):
    lrj.adapters.noble(activation="relu6")
  with pytest.raises(ValueError, match="min_freq <= max_freq"):
    lrj.adapters.noble(min_freq=2.0, max_freq=1.0)
  with pytest.raises(ValueError, match="up_init_scale must be >= 0"):
    lrj.adapters.noble(up_init_scale=-1.0)
  with pytest.raises(ValueError, match="rank must be a positive integer"):
    lrj.adapters.noble(rank=0)

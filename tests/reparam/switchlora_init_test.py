"""SwitchLoRA: the official initialization of factors and candidates, and the switch schedule."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import switchlora

from lrj_testing import attached_linear


def _model(spec, fan_in=256, fan_out=128, seed=0):
  return attached_linear(spec, fan_in, fan_out, seed)


def _official_bounds(n, m, r):
  """lora_utils.get_init_lora_bound of the official code, n = in_features, m = out_features."""
  gain = math.sqrt(2.0 / (1 + 5))  # torch calculate_gain('leaky_relu', sqrt(5))
  std_a = ((m ** 0.5 * r) / n ** 1.5) ** 0.25 * gain ** 0.5
  std_b = (r / (m * n) ** 0.5) ** 0.25 * gain ** 0.5
  return math.sqrt(3) * std_a, math.sqrt(3) * std_b


def test_factors_and_candidates_follow_the_official_init():
  fan_in, fan_out, r = 256, 128, 8
  layer = _model(lrj.adapters.switchlora(rank=r), fan_in, fan_out).layer
  bound_a, bound_b = _official_bounds(fan_in, fan_out, r)
  np.testing.assert_allclose(layer.spec.init_bounds(fan_in, fan_out), (bound_a, bound_b),
                             rtol=1e-12)
  # min(fan_in, fan_out) candidates in all, r of them are the factors' vectors.
  assert layer.candidates_a.shape == (fan_in, fan_out - r)
  assert layer.candidates_b.shape == (fan_out - r, fan_out)
  for values, bound in ((layer.lora_a, bound_a), (layer.candidates_a, bound_a),
                        (layer.lora_b, bound_b), (layer.candidates_b, bound_b)):
    v = np.asarray(values[...], np.float64)
    assert np.all(np.abs(v) <= bound)
    np.testing.assert_allclose(v.std(), bound / math.sqrt(3), rtol=0.06)
  # With the official scaling 1 / r (alpha = 1), s A B has entries of variance 1 / (3 fan_in).
  assert layer.scale == 1.0 / r
  delta = np.asarray(layer.delta_matrix(), np.float64)
  np.testing.assert_allclose(delta.var(), 1.0 / (3 * fan_in), rtol=0.1)
  assert type(layer).identity_at_init is False


def test_other_lora_inits_keep_lora_factors():
  layer = _model(lrj.adapters.switchlora(rank=4, init="gaussian"), 32, 16).layer
  np.testing.assert_array_equal(layer.lora_b[...], 0.0)
  assert layer.candidates_b.shape == (12, 16)


def test_scheduled_count_is_the_official_rate():
  # Official: interval = 40 / rate(t), rate = 0.3^((t + 1) / descend), r / interval per step.
  keys = jax.random.split(jax.random.key(0), 4000)
  for step, descend, every in ((0, None, 1), (99, 100, 1), (199, 100, 10)):
    rate = 1.0 if descend is None else 0.3 ** ((step + 1) / descend)
    expected = every * 8 * rate / 40
    counts = [switchlora.scheduled_count(k, 8, step, every, 40.0, descend) for k in keys]
    assert set(counts) <= {math.floor(expected), math.floor(expected) + 1}
    np.testing.assert_allclose(np.mean(counts), expected, rtol=0.08)
  assert switchlora.switch_rate(10**6, 100) == 1e-8


def test_scheduled_switch_keeps_the_function():
  model = _model(lrj.adapters.switchlora(rank=8), 32, 24)
  x = jax.random.normal(jax.random.key(1), (5, 32))
  y = model(x)
  opt_state = optax.adam(1e-3).init(nnx.state(model, lrj.AdapterParam))
  a_before, b_before = np.asarray(model.layer.lora_a[...]), np.asarray(model.layer.lora_b[...])
  # 10 * 8 / 10 = 8 per event, capped by the official bound r / 2 = 4.
  event = switchlora.SwitchLoRASwitch(every=10, interval=10.0, seed=2)
  model, opt_state = event(model, opt_state, 10)
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      np.flatnonzero(np.any(np.asarray(model.layer.lora_a[...]) != a_before, axis=0)), [0, 1, 2, 3])
  np.testing.assert_array_equal(
      np.flatnonzero(np.any(np.asarray(model.layer.lora_b[...]) != b_before, axis=1)), [4, 5, 6, 7])


def test_bad_input():
  with pytest.raises(ValueError, match="switchlora at 'layer': rank=8 leaves no candidates"):
    _model(lrj.adapters.switchlora(rank=8), 8, 9)
  with pytest.raises(ValueError, match="either count .* or interval"):
    switchlora.SwitchLoRASwitch(count=2, interval=40.0)
  with pytest.raises(ValueError, match="interval must be > 0"):
    switchlora.SwitchLoRASwitch(interval=0.0)
  with pytest.raises(ValueError, match="descend_steps needs interval"):
    switchlora.SwitchLoRASwitch(descend_steps=100)

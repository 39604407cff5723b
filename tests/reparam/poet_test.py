"""POET: W = R_in W0 R_out keeps the spectrum of W0; Q = 0 is W0; merge-then-reinit is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import events
from lowrank_jax.reparam import poet

from lrj_testing import attached_linear


def _model(spec, fan_in=16, fan_out=12, seed=0):
  return attached_linear(spec, fan_in, fan_out, seed)


def _randomize(model, seed, scale=0.1):
  layer = model.layer
  for i, name in enumerate(("q_in", "q_out")):
    leaf = getattr(layer, name)
    leaf[...] = scale * jax.random.normal(jax.random.key(seed + i), leaf.shape)


def _train(model, steps, event=None, lr=1e-2):
  x = jax.random.normal(jax.random.key(5), (32, model.layer.view.fan_in))
  target = jax.random.normal(jax.random.key(6), (32, model.layer.view.fan_out))
  graphdef, params, rest = nnx.split(model, lrj.AdapterParam, ...)
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rest):
    def loss(params):
      return jnp.mean((nnx.merge(graphdef, params, rest)(x) - target) ** 2)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  losses = []
  for t in range(1, steps + 1):
    params, opt_state, value = step(params, opt_state, rest)
    losses.append(float(value))
    if event is not None and event.due(t):
      m = nnx.merge(graphdef, params, rest)
      m, opt_state = event(m, opt_state, t)
      _, params, rest = nnx.split(m, lrj.AdapterParam, ...)
  return nnx.merge(graphdef, params, rest), losses


def _singular_values(layer):
  return np.linalg.svd(np.asarray(layer.effective_matrix(), np.float64), compute_uv=False)


def _w0_singular_values(layer):
  return np.linalg.svd(np.asarray(layer.view.to_matrix(layer.base.kernel[...]), np.float64),
                       compute_uv=False)


@pytest.mark.parametrize("block_size", [None, 4])
def test_q_zero_gives_exactly_w0(block_size):
  model = _model(lrj.adapters.poet(block_size=block_size))
  layer = model.layer
  w0 = np.asarray(layer.view.to_matrix(layer.base.kernel[...]))
  np.testing.assert_array_equal(np.asarray(layer.effective_matrix()), w0)
  r_in, r_out = layer.orthogonal_factors()
  np.testing.assert_array_equal(np.asarray(r_in), np.eye(16))
  np.testing.assert_array_equal(np.asarray(r_out), np.eye(12))


@pytest.mark.parametrize("block_size", [None, 4])
def test_effective_weight_is_r_in_w0_r_out_with_orthogonal_factors(block_size):
  model = _model(lrj.adapters.poet(block_size=block_size, parametrization="cayley"))
  _randomize(model, seed=3)
  layer = model.layer
  r_in, r_out = (np.asarray(r, np.float64) for r in layer.orthogonal_factors())
  np.testing.assert_allclose(r_in @ r_in.T, np.eye(16), atol=1e-5)
  np.testing.assert_allclose(r_out.T @ r_out, np.eye(12), atol=1e-5)
  w0 = np.asarray(layer.view.to_matrix(layer.base.kernel[...]), np.float64)
  np.testing.assert_allclose(layer.effective_matrix(), r_in @ w0 @ r_out, rtol=1e-5, atol=1e-5)
  if block_size is not None:  # a permuted block-diagonal factor has k blocks of b x b nonzeros
    assert np.sum(np.abs(r_in) > 1e-9) <= 4 * 4 * 4


@pytest.mark.parametrize("block_size,event_every", [(None, None), (4, 25)])
def test_spectrum_of_w0_is_kept_through_training(block_size, event_every):
  spec = lrj.adapters.poet(block_size=block_size, parametrization="cayley")
  model = _model(spec)
  sv0 = _singular_values(model.layer)
  event = poet.POETMergeReinit(every=event_every) if event_every else None
  model, losses = _train(model, steps=150, event=event)
  assert losses[-1] < 0.9 * losses[0]
  np.testing.assert_allclose(_singular_values(model.layer), sv0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(_w0_singular_values(model.layer), sv0, rtol=1e-4, atol=1e-5)


def test_cayley_neumann_spectrum_error_is_small_and_falls_with_order():
  drift = []
  for order in (1, 2, 4):
    model = _model(lrj.adapters.poet(block_size=4, neumann_order=order))
    sv0 = _singular_values(model.layer)
    model, _ = _train(model, steps=100, event=poet.POETMergeReinit(every=20))
    drift.append(np.abs(_singular_values(model.layer) - sv0).max() / sv0.max())
  assert drift[0] > drift[1] > drift[2], drift
  assert drift[2] < 1e-3, drift


def test_merge_then_reinit_keeps_function_and_zeros_q_state():
  model = _model(lrj.adapters.poet(block_size=4))
  model, _ = _train(model, steps=10)  # moves Q away from 0
  x = jax.random.normal(jax.random.key(9), (4, 16))
  y_before = model(x)
  params = nnx.state(model, lrj.AdapterParam)
  opt_state = optax.adam(1e-2).init(params)
  opt_state = jax.tree_util.tree_map(lambda v: v + 1.0, opt_state)  # non-zero moments
  perm_before = np.asarray(model.layer.perm_in[...])
  event = poet.POETMergeReinit(every=5, seed=1)
  assert event.due(10) and not event.due(11)
  model, opt_state = event(model, opt_state, 10)
  np.testing.assert_allclose(model(x), y_before, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(model.layer.q_in[...]))
  assert not np.any(np.asarray(model.layer.q_out[...]))
  assert not np.array_equal(np.asarray(model.layer.perm_in[...]), perm_before)
  adam = opt_state[0]
  for moments in (adam.mu, adam.nu):
    for leaf in jax.tree_util.tree_leaves(moments):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert int(adam.count) == 1  # the step count is not a moment of Q


def test_event_is_a_function_of_seed_and_step():
  a, b = (_model(lrj.adapters.poet(block_size=4)) for _ in range(2))
  event = poet.POETMergeReinit(every=3, seed=7)
  event(a, (), 6)
  event(b, (), 6)
  np.testing.assert_array_equal(np.asarray(a.layer.perm_out[...]), np.asarray(b.layer.perm_out[...]))


def test_w0_inits():
  gauss = _model(lrj.adapters.poet(w0_init="normalized_gaussian")).layer
  w = np.asarray(gauss.view.to_matrix(gauss.base.kernel[...]))
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)
  assert type(gauss).identity_at_init is False
  uniform = _model(lrj.adapters.poet(w0_init="uniform_spectrum")).layer
  np.testing.assert_allclose(_w0_singular_values(uniform), 1.0, rtol=1e-5)
  assert lrj.adapters.poet().num_params(16, 12) == 16 * 15 // 2 + 12 * 11 // 2
  assert lrj.adapters.poet(block_size=4).num_params(16, 12) == (4 + 3) * 6


def test_official_w0_inits_normalize_the_base_init():
  # Official init_type='normalized': W / ||W||_row on the (out, in) weight, i.e. every output
  # column of our (fan_in, fan_out) matrix to unit norm; 'mup_normalized' then rescales to
  # spectral norm mup_alpha * sqrt(d_out / d_in).
  reference = _model(lrj.adapters.poet()).layer
  w_base = np.asarray(reference.view.to_matrix(reference.base.kernel[...]), np.float64)
  normalized = w_base / np.linalg.norm(w_base, axis=0, keepdims=True)
  layer = _model(lrj.adapters.poet(w0_init="normalized")).layer
  np.testing.assert_allclose(layer.view.to_matrix(layer.base.kernel[...]), normalized, rtol=1e-5,
                             atol=1e-6)
  assert type(layer).identity_at_init is False
  mup = _model(lrj.adapters.poet(w0_init="mup_normalized", mup_alpha=2.0)).layer
  fan_in, fan_out = w_base.shape
  expected = normalized * 2.0 * np.sqrt(fan_out / fan_in) / np.linalg.norm(normalized, ord=2)
  np.testing.assert_allclose(mup.view.to_matrix(mup.base.kernel[...]), expected, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="mup_alpha must be > 0"):
    lrj.adapters.poet(mup_alpha=0.0)


def test_bad_input():
  with pytest.raises(ValueError, match="poet at 'layer': block_size=5 does not divide fan_in=16"):
    _model(lrj.adapters.poet(block_size=5))
  with pytest.raises(ValueError, match="neumann_order k must be an integer >= 1"):
    lrj.adapters.poet(neumann_order=0)
  with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
    lrj.adapters.poet(block_size=1)
  with pytest.raises(ValueError, match="w0_init must be one of"):
    lrj.adapters.poet(w0_init="xavier")
  with pytest.raises(ValueError, match="period `every` must be an integer >= 1"):
    poet.POETMergeReinit(every=0)
  with pytest.raises(ValueError, match="Unknown event 'poet'.*poet_merge_reinit"):
    events.build("poet")

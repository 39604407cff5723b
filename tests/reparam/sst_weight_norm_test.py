"""SST (masked singular vectors, resampling proportional to s) and weight normalization."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import sst

from lrj_testing import Host


def _model(spec, seed=0):
  base = nnx.Linear(16, 12, rngs=nnx.Rngs(seed))
  w = np.asarray(base.kernel[...], np.float64)
  model = Host(base)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(seed + 1))
  return model, w


def test_sst_starts_at_w0_and_trains_only_the_rounds_vectors():
  model, w = _model(lrj.adapters.sst(rank=3))
  layer = model.layer
  np.testing.assert_allclose(layer.effective_matrix(), w, atol=1e-5)
  mask = np.asarray(layer.round_mask[...])
  assert mask.sum() == 3
  x, target = jax.random.normal(jax.random.key(1), (8, 16)), jax.random.normal(jax.random.key(2), (8, 12))
  grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2),
                   argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
  gu, gs, gvt = (np.asarray(grads["layer"][k][...]) for k in ("u", "s", "vt"))
  assert np.all(np.abs(gu[:, mask == 0]) == 0) and np.all(np.abs(gu[:, mask == 1]).sum(0) > 0)
  assert np.all(np.abs(gvt[mask == 0]) == 0) and np.all(np.abs(gvt[mask == 1]).sum(1) > 0)
  assert np.all(gs != 0)


def test_sst_resample_keeps_function_reorthogonalizes_and_zeros_moments():
  model, _ = _model(lrj.adapters.sst(rank=2))
  x = jax.random.normal(jax.random.key(3), (4, 16))
  layer = model.layer
  layer.u[...] = layer.u[...] + 0.05 * jax.random.normal(jax.random.key(4), layer.u.shape)
  y = model(x)
  opt_state = jax.tree_util.tree_map(lambda v: v + 1.0,
                                     optax.adam(1e-3).init(nnx.state(model, lrj.AdapterParam)))
  event = sst.SSTResample(every=10, seed=2)
  model, opt_state = event(model, opt_state, 10)
  np.testing.assert_allclose(model(x), y, rtol=1e-4, atol=1e-4)
  u = np.asarray(model.layer.u[...], np.float64)
  np.testing.assert_allclose(u.T @ u, np.eye(12), atol=1e-5)
  for leaf in jax.tree_util.tree_leaves((opt_state[0].mu, opt_state[0].nu)):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_sst_sampling_is_proportional_to_singular_values():
  s = jnp.array([3.0, 1.0])
  keys = jax.random.split(jax.random.key(0), 4000)
  masks = jax.vmap(lambda k: sst.sample_round(k, s, 1))(keys)
  share = float(masks[:, 0].mean())
  assert abs(share - 0.75) < 0.03, share  # 4 sigma of a binomial(4000, 0.75) share


def test_weight_norm_is_gain_times_unit_direction():
  model, w = _model(lrj.adapters.weight_norm())
  layer = model.layer
  np.testing.assert_allclose(layer.effective_matrix(), w, rtol=1e-5, atol=1e-6)
  layer.direction[...] = 3.0 * layer.direction[...]  # the scale of v does not matter
  np.testing.assert_allclose(layer.effective_matrix(), w, rtol=1e-5, atol=1e-6)
  layer.gain[...] = 2.0 * layer.gain[...]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(layer.effective_matrix()), axis=0),
                             2.0 * np.linalg.norm(w, axis=0), rtol=1e-5)
  x = jax.random.normal(jax.random.key(5), (3, 16))
  np.testing.assert_allclose(model(x), np.asarray(x) @ (2.0 * w) + np.asarray(layer.base.bias[...]),
                             rtol=1e-5, atol=1e-5)


def test_bad_input():
  with pytest.raises(ValueError, match="sst: rank must be a positive integer"):
    lrj.adapters.sst(rank=0)
  with pytest.raises(ValueError, match="sst at 'layer': rank=13 exceeds"):
    _model(lrj.adapters.sst(rank=13))
  with pytest.raises(ValueError, match="weight_norm: eps must be >= 0"):
    lrj.adapters.weight_norm(eps=-1.0)
  with pytest.raises(ValueError, match="period `every` must be an integer >= 1"):
    sst.SSTResample(every=-2)

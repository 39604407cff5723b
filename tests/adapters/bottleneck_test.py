"""AdapterTune and MAP: the defining formulas, init, norms without materialization, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.adapters import bottleneck

from lrj_testing import Host
from lrj_testing import randomize_adapters


def test_adaptertune_is_a_residual_bottleneck_on_the_output():
  model = Host(nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (3, 6))
  h = model(x)
  lrj.attach(model, [("layer", lrj.adapters.adaptertune(rank=2, activation="relu"))],
             rngs=nnx.Rngs(2))
  np.testing.assert_allclose(model(x), h, atol=1e-6)  # U = 0
  randomize_adapters(model, 3, 0.5)
  d, u = np.asarray(model.layer.down[...]), np.asarray(model.layer.up[...])
  expected = np.asarray(h) + np.maximum(np.asarray(h) @ d, 0) @ u
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_adaptertune_on_einsum_acts_on_the_feature_axes():
  model = Host(nnx.Einsum("btd,dnh->btnh", (4, 2, 3), (2, 3), rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (2, 3, 4))
  h = np.asarray(model(x))
  lrj.attach(model, [("layer", lrj.adapters.adaptertune(rank=2, activation="tanh"))],
             rngs=nnx.Rngs(2))
  randomize_adapters(model, 3, 0.5)
  d, u = np.asarray(model.layer.down[...]), np.asarray(model.layer.up[...])
  rows = h.reshape(2, 3, 6)
  expected = (rows + np.tanh(rows @ d) @ u).reshape(h.shape)
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_adaptertune_is_not_mergeable():
  model = Host(nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
  lrj.attach(model, [("layer", lrj.adapters.adaptertune())], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="not mergeable"):
    lrj.merge(model)


def test_map_formula_and_identity_at_init():
  model = Host(nnx.Linear(7, 6, rngs=nnx.Rngs(0)))
  w0 = np.asarray(model.layer.kernel[...])
  x = jax.random.normal(jax.random.key(1), (4, 7))
  y0 = model(x)
  lrj.attach(model, [("layer", lrj.adapters.map(rank=3))], rngs=nnx.Rngs(2))
  adapter = model.layer
  np.testing.assert_allclose(model(x), y0, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(adapter.lora_b[...]).max()) > 0  # the direction is defined at init
  randomize_adapters(model, 3, 0.5)
  a, b = np.asarray(adapter.lora_a[...]), np.asarray(adapter.lora_b[...])
  alpha = float(adapter.alpha_rel[...]) * np.linalg.norm(w0)
  beta = float(adapter.beta_rel[...]) * np.linalg.norm(w0)
  dw = a @ b
  expected_w = alpha * w0 / np.linalg.norm(w0) + beta * dw / np.linalg.norm(dw)
  np.testing.assert_allclose(adapter.effective_matrix(), expected_w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model(x), np.asarray(x) @ expected_w + np.asarray(adapter.base.bias[...]),
                             rtol=1e-4, atol=1e-5)
  # ||W'||: the base term has norm |alpha|, the update term |beta|.
  np.testing.assert_allclose(np.linalg.norm(beta * dw / np.linalg.norm(dw)), abs(beta), rtol=1e-5)


def test_map_norm_without_materialization():
  a = jax.random.normal(jax.random.key(4), (9, 3))
  b = jax.random.normal(jax.random.key(5), (3, 8))
  np.testing.assert_allclose(bottleneck.lora_frobenius_norm(a, b), np.linalg.norm(a @ b), rtol=1e-5)


def test_beta_gets_a_gradient_at_init():
  model = Host(nnx.Linear(7, 6, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (4, 7))
  target = jax.random.normal(jax.random.key(2), (4, 6))
  lrj.attach(model, [("layer", lrj.adapters.map(rank=2))], rngs=nnx.Rngs(2))
  grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2),
                   argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
  assert abs(float(grads["layer"]["beta_rel"][...])) > 0


def test_bottleneck_bad_input():
  with pytest.raises(ValueError, match="unknown activation"):
    lrj.adapters.adaptertune(activation="swish2")
  with pytest.raises(ValueError, match="positive integer"):
    lrj.adapters.map(rank=0)
  with pytest.raises(ValueError, match=r"adaptertune at 'layer': rank=6 exceeds fan_out = 5"):
    lrj.attach(Host(nnx.Linear(6, 5, rngs=nnx.Rngs(0))),
               [("layer", lrj.adapters.adaptertune(rank=6))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"map at 'layer': rank=6 exceeds min\(fan_in, fan_out\)"):
    lrj.attach(Host(nnx.Linear(6, 5, rngs=nnx.Rngs(0))), [("layer", lrj.adapters.map(rank=6))],
               rngs=nnx.Rngs(0))

"""StelLA adapter: the factor layout, inits and the official (uncompensated) start."""

import jax
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj


class _Host(nnx.Module):

  def __init__(self):
    self.layer = nnx.Linear(12, 10, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.layer(x)


@pytest.mark.parametrize("init", ["random", "svd_major", "svd_minor"])
def test_factors_orthonormal_and_uncompensated_start(init):
  model = _Host()
  w0 = np.asarray(model.layer.kernel[...])
  x = jax.random.normal(jax.random.key(1), (5, 12))
  y0 = model(x)
  lrj.attach(model, [("layer", lrj.adapters.stella(rank=3, alpha=6.0, init=init, compensate=False))],
             rngs=nnx.Rngs(2))
  adapter = model.layer
  v, u = adapter.stella_v[...], adapter.stella_u[...]
  np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-5)
  np.testing.assert_array_equal(adapter.base.kernel[...], w0)
  # Official start: S = I, so the layer is W0 + s V U^T with s = alpha / r = 2.
  np.testing.assert_allclose(model(x), y0 + 2.0 * (x @ v) @ u.T, rtol=1e-5, atol=1e-5)
  if init != "random":
    left, sigma, right_t = np.linalg.svd(w0)
    cols = slice(0, 3) if init == "svd_major" else slice(7, 10)
    np.testing.assert_allclose(np.abs(v.T @ left[:, cols]), np.eye(3), atol=1e-4)
    np.testing.assert_allclose(np.abs(u.T @ right_t[cols].T), np.eye(3), atol=1e-4)


@pytest.mark.parametrize("hp", [dict(s_init="zero"), dict(compensate=True)])
def test_options_that_start_at_the_base_function(hp):
  model = _Host()
  x = jax.random.normal(jax.random.key(3), (5, 12))
  y0 = model(x)
  lrj.attach(model, [("layer", lrj.adapters.stella(rank=3, **hp))], rngs=nnx.Rngs(4))
  np.testing.assert_allclose(model(x), y0, rtol=1e-5, atol=1e-5)
  s = model.layer.stella_s[...]
  np.testing.assert_array_equal(s, np.zeros((3, 3)) if hp.get("s_init") else np.eye(3))


def test_diag_s_and_bad_input():
  model = _Host()
  lrj.attach(model, [("layer", lrj.adapters.stella(rank=2, diag_s=True))], rngs=nnx.Rngs(0))
  assert model.layer.stella_s.shape == (2,)
  with pytest.raises(ValueError, match="exceeds min"):
    lrj.attach(_Host(), [("layer", lrj.adapters.stella(rank=11))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown init"):
    lrj.adapters.stella(init="pissa")
  with pytest.raises(ValueError, match="needs s_init='identity'"):
    lrj.adapters.stella(s_init="zero", compensate=True)

"""Monarch / BTT: factored forward equals the dense matrix; projection recovers the class exactly."""

import jax
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import monarch


def _cores(k, p, l, q, r, seed=0):
  return (jax.random.normal(jax.random.key(seed), (k, q, p, r)),
          jax.random.normal(jax.random.key(seed + 1), (q, l, k, r)))


def test_dense_matrix_entries_are_products_of_core_entries():
  core_in, core_out = _cores(3, 4, 5, 2, 2)
  w = np.asarray(monarch.dense_from_cores(core_in, core_out))
  ci, co = np.asarray(core_in), np.asarray(core_out)
  for (a, i, c, b) in [(0, 0, 0, 0), (2, 3, 4, 1), (1, 2, 0, 1)]:
    assert np.isclose(w[a * 4 + i, c * 2 + b], np.sum(ci[a, b, i] * co[b, c, a]), atol=1e-5)
  x = jax.random.normal(jax.random.key(3), (2, 6, 12))
  np.testing.assert_allclose(monarch.factored_matmul(x, core_in, core_out), np.asarray(x) @ w,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [1, 2])
def test_projecting_a_structured_matrix_recovers_it_exactly(r):
  w = monarch.dense_from_cores(*_cores(4, 4, 4, 4, r, seed=5))
  projected = monarch.dense_from_cores(*monarch.project(w, 4, 4, r))
  np.testing.assert_allclose(projected, w, rtol=1e-4, atol=1e-4)


def test_projection_is_best_per_slice_and_rank_one_for_monarch():
  w = jax.random.normal(jax.random.key(0), (12, 10))
  core_in, core_out = monarch.project(w, 3, 2, 1)
  approx = np.asarray(monarch.dense_from_cores(core_in, core_out))
  slices = np.asarray(w).reshape(3, 4, 5, 2).transpose(0, 3, 1, 2)
  got = approx.reshape(3, 4, 5, 2).transpose(0, 3, 1, 2)
  for a in range(3):
    for b in range(2):
      u, s, vt = np.linalg.svd(slices[a, b])
      np.testing.assert_allclose(got[a, b], s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)
      assert np.linalg.matrix_rank(got[a, b], tol=1e-5) == 1


def test_layer_forward_param_count_and_random_init_scale():
  base = nnx.Linear(16, 12, rngs=nnx.Rngs(0))
  host = nnx.Dict({"layer": base})
  spec = lrj.adapters.btt(rank=2, init="random")
  lrj.attach(host, [("layer", spec)], rngs=nnx.Rngs(1))
  layer = host["layer"]
  assert spec.layout(16, 12) == (4, 4, 4, 3)
  assert spec.num_params(16, 12) == 4 * 3 * 2 * (4 + 4)
  x = jax.random.normal(jax.random.key(2), (5, 16))
  np.testing.assert_allclose(host["layer"](x), np.asarray(x) @ np.asarray(layer.effective_matrix())
                             + np.asarray(base.bias[...]), rtol=1e-5, atol=1e-5)
  big = lrj.adapters.btt(rank=4, init="random")
  wide = nnx.Dict({"layer": nnx.Linear(256, 256, rngs=nnx.Rngs(0))})
  lrj.attach(wide, [("layer", big)], rngs=nnx.Rngs(1))
  w = np.asarray(wide["layer"].effective_matrix())
  # Entry variance of the product: (1/p) * (1/(k r)) * r terms = 1/(k p) = 1/fan_in.
  assert abs(w.var() * 256 - 1.0) < 0.15


def test_bad_input():
  with pytest.raises(ValueError, match="monarch at 'layer': 5 blocks do not divide fan_in=16"):
    lrj.attach(nnx.Dict({"layer": nnx.Linear(16, 12, rngs=nnx.Rngs(0))}),
               [("layer", lrj.adapters.monarch(in_blocks=5))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="btt: rank must be an integer >= 1"):
    lrj.adapters.btt(rank=0)
  with pytest.raises(ValueError, match="init must be one of"):
    lrj.adapters.monarch(init="xavier")

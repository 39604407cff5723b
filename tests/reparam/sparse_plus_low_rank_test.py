"""SLTrain and LOST: the factored weight at init is the stated dense weight; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj


class Host(nnx.Module):

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def _model(spec, fan_in=16, fan_out=12, seed=0):
  base = nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed))
  base.bias[...] = jax.random.normal(jax.random.key(seed + 7), base.bias.shape)
  w = np.asarray(base.kernel[...], np.float64)
  model = Host(base)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(seed + 1))
  return model, w, np.asarray(base.bias[...])


def test_sltrain_weight_is_low_rank_plus_random_sparse_support():
  spec = lrj.adapters.sltrain(rank=3, alpha=6.0, sparsity=0.13)
  model, _, bias = _model(spec)
  layer = model.layer
  a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
  support = np.asarray(layer.sparse_support[...])
  values = np.asarray(layer.sparse_values[...], np.float64)
  # Official: int(sp_ratio * m * n) entries (floor: 0.13 * 192 = 24.96 -> 24), drawn without
  # replacement.
  assert support.size == 24 == values.size and len(set(support)) == support.size
  dense_sparse = np.zeros(16 * 12)
  dense_sparse[support] = values
  expected = 2.0 * a @ b + dense_sparse.reshape(16, 12)
  np.testing.assert_allclose(layer.effective_matrix(), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(layer.base.kernel[...], 0.0)  # W0 replaced, not adapted
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 16)))
  np.testing.assert_allclose(model(jnp.asarray(x)), x @ expected + bias, rtol=1e-5, atol=1e-5)


def test_sltrain_initialization_follows_the_official_code():
  fan_in, fan_out, rank = 256, 128, 16
  model, _, _ = _model(lrj.adapters.sltrain(rank=rank, sparsity=0.03), fan_in, fan_out)
  layer = model.layer
  a = np.asarray(layer.lora_a[...], np.float64)
  values = np.asarray(layer.sparse_values[...], np.float64)
  bound = 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) on (r, fan_in) and U(+-1/sqrt(fan_in))
  assert np.all(np.abs(a) <= bound) and np.all(np.abs(values) <= bound)
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)
  np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1)
  np.testing.assert_array_equal(layer.lora_b[...], 0.0)  # B = 0: the weight starts as S
  assert values.size == int(0.03 * fan_in * fan_out)
  np.testing.assert_allclose(layer.effective_matrix(), layer.sparse_matrix(), atol=0)


def test_sltrain_support_stays_fixed_while_values_train():
  model, _, _ = _model(lrj.adapters.sltrain(rank=2, sparsity=0.2))
  support = np.asarray(model.layer.sparse_support[...])
  values = np.asarray(model.layer.sparse_values[...])
  x, target = jax.random.normal(jax.random.key(1), (8, 16)), jax.random.normal(jax.random.key(2), (8, 12))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lrj.AdapterParam)
  for _ in range(3):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2),
                     argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
    optimizer.update(model, grads)
  np.testing.assert_array_equal(model.layer.sparse_support[...], support)
  assert not np.allclose(model.layer.sparse_values[...], values)
  off_support = np.ones(16 * 12, bool)
  off_support[support] = False
  low_rank = np.asarray(model.layer.effective_matrix()).reshape(-1) - np.asarray(
      model.layer.spec.scale * model.layer.lora_a[...] @ model.layer.lora_b[...]).reshape(-1)
  np.testing.assert_allclose(low_rank[off_support], 0.0, atol=1e-6)


def test_lost_weight_is_top_r_svd_plus_channel_sparse_complement():
  spec = lrj.adapters.lost(rank=3, alpha=1.5, sparsity=0.25)
  model, w, _ = _model(spec)
  layer = model.layer
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  top = (u[:, :3] * s[:3]) @ vt[:3]
  np.testing.assert_allclose(layer.spec.scale * np.asarray(layer.lora_a[...], np.float64)
                             @ np.asarray(layer.lora_b[...], np.float64), top, atol=1e-5)
  # Input channels (rows of our (fan_in, fan_out) matrix, columns of the paper's (out, in)
  # weight) with the largest L2 norm of the complement: round(0.25 * 16) = 4 of them.
  complement = w - top
  keep = np.sort(np.argsort(-np.linalg.norm(complement, axis=1))[:4])
  expected = top.copy()
  expected[keep] += complement[keep]
  np.testing.assert_allclose(layer.effective_matrix(), expected, atol=1e-5)
  assert layer.sparse_values[...].size == 4 * 12
  untouched = np.setdiff1d(np.arange(16), keep)
  np.testing.assert_allclose(np.asarray(layer.effective_matrix())[untouched], top[untouched],
                             atol=1e-5)
  # Keeping every channel of the complement reproduces the original weight.
  full, w_full, _ = _model(lrj.adapters.lost(rank=3, sparsity=0.99))
  np.testing.assert_allclose(full.layer.effective_matrix(), w_full, atol=1e-5)


@pytest.mark.parametrize("name", ["sltrain", "lost"])
def test_bad_input(name):
  for bad in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=rf"{name}: sparsity must be in the open interval \(0, 1\)"):
      lrj.adapters.get(name, sparsity=bad)
  with pytest.raises(ValueError, match=rf"{name}: rank must be a positive integer"):
    lrj.adapters.get(name, rank=0)
  with pytest.raises(ValueError, match=rf"{name} at 'layer': rank=20 exceeds"):
    _model(lrj.adapters.get(name, rank=20))

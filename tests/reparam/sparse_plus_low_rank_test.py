"""SLTrain and LOST: the factored weight at init is the stated dense weight, LOST's
gamma-weighted branches and activation against numpy restatements; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj

from lrj_testing import Host
from lrj_testing import randomize_adapters


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


def _lost_leaves(layer):
  """(A, B, kept input channels I, W_s (len(I), fan_out)) from the leaves, in float64."""
  a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
  support = np.asarray(layer.sparse_support[...])
  fan_out = b.shape[1]
  channels = support[::fan_out] // fan_out
  assert np.array_equal(support, (channels[:, None] * fan_out + np.arange(fan_out)).reshape(-1))
  values = np.asarray(layer.sparse_values[...], np.float64).reshape(len(channels), fan_out)
  return a, b, channels, values


def test_lost_weight_is_top_r_svd_plus_channel_sparse_complement():
  gamma, alpha, rank = 0.3, 1.5, 3
  model, w, bias = _model(lrj.adapters.lost(rank=rank, alpha=alpha, sparsity=0.3, gamma=gamma))
  layer = model.layer
  s = alpha / rank
  u, sv, vt = np.linalg.svd(w, full_matrices=False)
  top = (u[:, :3] * sv[:3]) @ vt[:3]
  a, b, channels, values = _lost_leaves(layer)
  np.testing.assert_allclose(s * gamma * a @ b, top, atol=1e-5)
  # Input channels (rows of our (fan_in, fan_out) matrix, columns of the paper's (out, in)
  # weight) with the largest L2 norm of the complement: max(1, int(0.3 * 16)) = 4 of them.
  complement = w - top
  keep = np.sort(np.argsort(-np.linalg.norm(complement, axis=1))[:4])
  np.testing.assert_array_equal(channels, keep)
  np.testing.assert_allclose(s * (1 - gamma) * values, complement[keep], atol=1e-5)
  expected = top.copy()
  expected[keep] += complement[keep]
  np.testing.assert_allclose(layer.effective_matrix(), expected, atol=1e-5)
  x = np.asarray(jax.random.normal(jax.random.key(3), (5, 16)))
  np.testing.assert_allclose(model(jnp.asarray(x)), x @ expected + bias, rtol=1e-4, atol=1e-4)
  # The channel count is floored: 0.99 * 16 -> 15 kept, and the dropped channel is top-r only.
  most, w_most, _ = _model(lrj.adapters.lost(rank=3, sparsity=0.99))
  top_most = np.linalg.svd(w_most, full_matrices=False)
  top_most = (top_most[0][:, :3] * top_most[1][:3]) @ top_most[2][:3]
  dropped = np.setdiff1d(np.arange(16), _lost_leaves(most.layer)[2])
  assert dropped.size == 1 and most.layer.sparse_values[...].size == 15 * 12
  kept = np.setdiff1d(np.arange(16), dropped)
  np.testing.assert_allclose(np.asarray(most.layer.effective_matrix())[kept], w_most[kept], atol=1e-5)
  np.testing.assert_allclose(np.asarray(most.layer.effective_matrix())[dropped], top_most[dropped],
                             atol=1e-5)


@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_lost_output_is_the_gamma_weighted_sum_of_its_branches(activation):
  # s (gamma sigma(x A) B + (1 - gamma) x[:, I] W_s) + b on perturbed leaves (the paper's
  # weighted branches, written in the (fan_in, fan_out) layout).
  gamma, alpha, rank = 0.7, 8.0, 4
  model, _, bias = _model(lrj.adapters.lost(rank=rank, alpha=alpha, sparsity=0.25, gamma=gamma,
                                            activation=activation))
  randomize_adapters(model, 11, 0.3)
  a, b, channels, values = _lost_leaves(model.layer)
  sigma = {"identity": lambda z: z, "silu": lambda z: z / (1 + np.exp(-z))}[activation]
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 3, 16)), np.float64)
  expected = alpha / rank * (gamma * sigma(x @ a) @ b + (1 - gamma) * x[..., channels] @ values)
  np.testing.assert_allclose(model(jnp.asarray(x, jnp.float32)), expected + bias, rtol=1e-4,
                             atol=1e-4)


def test_lost_with_an_activation_is_not_mergeable_and_trains():
  model, _, _ = _model(lrj.adapters.lost(rank=3, activation="silu"))
  layer = model.layer
  assert not type(layer).mergeable and not layer.additive and not layer.identity_at_init
  for refused in (layer.delta, layer.effective_kernel, lambda: lrj.merge(model)):
    with pytest.raises(ValueError, match="'layer' \\(lost\\) is not mergeable"):
      refused()
  assert isinstance(model.layer, lrj.adapters.Adapter)  # left as it was
  x, target = jax.random.normal(jax.random.key(1), (8, 16)), jax.random.normal(jax.random.key(2), (8, 12))
  loss = lambda m: jnp.mean((m(x) - target) ** 2)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
  norms = {str(k): float(jnp.linalg.norm(v[...])) for k, v in nnx.to_flat_state(grads)}
  assert len(norms) == 3 and min(norms.values()) > 0, norms
  before = float(loss(model))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lrj.AdapterParam)
  for _ in range(5):
    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, lrj.AdapterParam))(model))
  assert float(loss(model)) < before


@pytest.mark.parametrize("name", ["sltrain", "lost"])
def test_bad_input(name):
  for bad in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=rf"{name}: sparsity must be in the open interval \(0, 1\)"):
      lrj.adapters.get(name, sparsity=bad)
  with pytest.raises(ValueError, match=rf"{name}: rank must be a positive integer"):
    lrj.adapters.get(name, rank=0)
  with pytest.raises(ValueError, match=rf"{name} at 'layer': rank=20 exceeds"):
    _model(lrj.adapters.get(name, rank=20))


def test_lost_bad_gamma_and_activation():
  for bad in (0.0, 1.0, -0.5, 2.0):
    with pytest.raises(ValueError, match=r"lost: gamma must be in the open interval \(0, 1\)"):
      lrj.adapters.lost(gamma=bad)
  with pytest.raises(ValueError, match="lost: activation must be one of .*'silu'.*got 'swish'"):
    lrj.adapters.lost(activation="swish")

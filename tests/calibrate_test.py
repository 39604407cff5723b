"""Calibration statistics lookup: clear errors for missing or mismatched statistics."""

import jax.numpy as jnp
import pytest

from lowrank_jax import calibrate


def test_site_stats_lookup_and_errors():
  grad = jnp.ones((4, 3))
  stats = {"blocks/0/attn/query": calibrate.SiteStats(grad=grad, num_tokens=10)}
  assert calibrate.site_stats(stats, "blocks/0/attn/query", "gora", "grad") is grad
  with pytest.raises(ValueError, match="needs calibration"):
    calibrate.site_stats(None, "blocks/0/attn/query", "gora", "grad")
  with pytest.raises(ValueError, match="another model"):
    calibrate.site_stats(stats, "blocks/1/attn/query", "gora", "grad")
  with pytest.raises(ValueError, match="input_gram"):
    calibrate.site_stats(stats, "blocks/0/attn/query", "gora", "input_gram")


import jax
import numpy as np
from flax import nnx

import lowrank_jax as lrj


class _TwoLayers(nnx.Module):

  def __init__(self, rngs):
    self.first = nnx.Linear(6, 5, rngs=rngs)
    self.conv = nnx.Conv(2, 3, kernel_size=(2, 2), rngs=rngs)

  def __call__(self, batch):
    x, images = batch
    return jnp.mean(self.first(x) ** 2) + jnp.mean(jnp.tanh(self.conv(images)))


def _batches(n):
  keys = jax.random.split(jax.random.key(0), 2 * n)
  return [(jax.random.normal(keys[2 * i], (4, 6)), jax.random.normal(keys[2 * i + 1], (2, 3, 3, 2)))
          for i in range(n)]


RULES = [("first|conv", lrj.adapters.lora(rank=2))]
loss_fn = lambda model, batch: model(batch)


def test_collect_matches_direct_gradients_and_activation_stats(tmp_path):
  model = _TwoLayers(nnx.Rngs(0))
  batches = _batches(3)
  stats = calibrate.collect(model, RULES, loss_fn, batches, activations="gram",
                            cache_dir=str(tmp_path / "cal"))
  assert sorted(stats) == ["conv", "first"]
  assert type(model.first) is nnx.Linear and type(model.conv) is nnx.Conv  # model restored
  # Reference: the mean of per-batch gradients of the full parameter state.
  grads = [nnx.grad(loss_fn)(model, b) for b in batches]
  g_first = np.mean([g["first"]["kernel"][...] for g in grads], axis=0)
  g_conv = np.mean([g["conv"]["kernel"][...].reshape(8, 3) for g in grads], axis=0)
  np.testing.assert_allclose(stats["first"].grad, g_first, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["conv"].grad, g_conv, rtol=1e-5, atol=1e-6)
  x = np.concatenate([b[0] for b in batches])
  np.testing.assert_allclose(stats["first"].input_gram, x.T @ x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["first"].input_sq_norm, (x * x).sum(0), rtol=1e-5)
  assert stats["first"].num_tokens == 12
  # Conv rows are the 2x2x2 patches of the SAME-padded 3x3 images (9 per image).
  patches = np.concatenate([np.asarray(jax.lax.conv_general_dilated_patches(
      b[1], (2, 2), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))) for b in batches])
  # conv_general_dilated_patches orders features (channel, window); ours are (window, channel).
  patches = patches.reshape(-1, 2, 4).transpose(0, 2, 1).reshape(-1, 8)
  np.testing.assert_allclose(stats["conv"].input_gram, patches.T @ patches, rtol=1e-4, atol=1e-4)
  assert stats["conv"].num_tokens == 3 * 2 * 9
  # A second call with the same settings loads the cache (even with no batches).
  cached = calibrate.collect(model, RULES, loss_fn, [], activations="gram",
                             cache_dir=str(tmp_path / "cal"))
  np.testing.assert_allclose(cached["conv"].grad, stats["conv"].grad)
  assert cached["first"].num_tokens == 12
  with pytest.raises(ValueError, match="other settings"):
    calibrate.collect(model, [("first", lrj.adapters.lora(rank=2))], loss_fn,
                      batches, activations="gram", cache_dir=str(tmp_path / "cal"))


def test_collect_bad_input():
  model = _TwoLayers(nnx.Rngs(0))
  with pytest.raises(ValueError, match="activations"):
    calibrate.collect(model, RULES, loss_fn, _batches(1), activations="norms")
  with pytest.raises(ValueError, match="nothing to collect"):
    calibrate.collect(model, RULES, loss_fn, _batches(1), grad=False)
  with pytest.raises(ValueError, match="yielded only 1"):
    calibrate.collect(model, RULES, loss_fn, _batches(1), num_batches=2)
  with pytest.raises(ValueError, match="match no module"):
    calibrate.collect(model, [("second", lrj.adapters.lora())], loss_fn, _batches(1))

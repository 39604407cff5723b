"""Spectral-condition scaling: init std gives spectral norm ~ sqrt(fan_out/fan_in); multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.reparam import scaling


@pytest.mark.parametrize("fan_in,fan_out", [(256, 256), (128, 512), (512, 128)])
def test_init_std_gives_spectral_norm_of_order_sqrt_fan_ratio(fan_in, fan_out):
  w = scaling.init_std(fan_in, fan_out) * np.random.default_rng(0).normal(size=(fan_in, fan_out))
  ratio = np.linalg.norm(w, 2) / np.sqrt(fan_out / fan_in)
  assert 0.5 < ratio < 3.0, ratio  # Theta(1): a Gaussian's norm is (sqrt(m) + sqrt(n)) sigma


def test_lr_multipliers_follow_the_update_kind():
  assert scaling.lr_multiplier(64, 256, "sgd") == 4.0
  assert scaling.lr_multiplier(64, 256, "adam", base_fans=(32, 32)) == 0.5
  assert scaling.lr_multiplier(64, 256, "orthogonal") == 2.0
  assert scaling.lr_multiplier(32, 32, "adam", base_fans=(32, 32)) == 1.0
  with pytest.raises(ValueError, match="update must be one of"):
    scaling.lr_multiplier(4, 4, "lion")
  with pytest.raises(ValueError, match="fan_in and fan_out must be >= 1"):
    scaling.init_std(0, 3)


def test_spectral_optimizer_scales_each_leaf_by_its_multiplier():
  params = {"w1": jnp.ones((16, 32)), "w2": jnp.ones((64, 8)), "bias": jnp.ones((8,))}
  labels = scaling.spectral_labels(params, "sgd", base_fans=(16, 16))
  assert labels == {"w1": "lr_x2", "w2": "lr_x0.125", "bias": "lr_x1"}
  tx = scaling.spectral_optimizer(optax.sgd, 0.1, params, update="sgd", base_fans=(16, 16))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w1"], -0.2)
  np.testing.assert_allclose(updates["w2"], -0.0125)
  np.testing.assert_allclose(updates["bias"], -0.1)

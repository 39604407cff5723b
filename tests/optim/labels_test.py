"""Path labels for optax.partition and ndim masks for optax.masked."""

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from lowrank_jax.optim import labels


def test_label_by_path_first_match_wins_and_works_with_partition():
  params = {"blocks": [{"attn": {"kernel": jnp.ones((4, 3))}, "norm": jnp.ones(3)}], "head": jnp.ones((3, 2))}
  label = labels.label_by_path([(r"blocks/\d+/attn/.*", "low_rank"), ("head", "low_rank"), (".*", "rest")])
  assert label(params) == {"blocks": [{"attn": {"kernel": "low_rank"}, "norm": "rest"}], "head": "low_rank"}
  tx = optax.partition({"low_rank": optax.sgd(1.0), "rest": optax.set_to_zero()}, label)
  updates, _ = tx.update(params, tx.init(params))
  assert float(updates["blocks"][0]["norm"].sum()) == 0 and float(updates["head"].sum()) == -6


def test_label_errors_name_the_path():
  params = {"a": {"kernel": jnp.ones(2)}, "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="No label rule matches parameter 'b'"):
    labels.label_by_path([("a/.*", "x")])(params)
  with pytest.raises(ValueError, match="'c/.*' matches no parameter.*a/kernel"):
    labels.label_by_path([("c/.*", "x"), (".*", "y")])(params)
  with pytest.raises(ValueError, match="pairs"):
    labels.label_by_path(["a/.*"])


def test_mask_by_ndim_and_nnx_paths():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  assert sorted(labels.leaf_paths(state)) == ["bias", "kernel"]  # Variables flatten to '.../value'
  assert labels.label_by_path([("kernel", "a"), ("bias", "b")])(nnx.to_pure_dict(state)) == {
      "bias": "b", "kernel": "a"}
  mask = labels.mask_by_ndim(2)(nnx.to_pure_dict(state))
  assert mask == {"bias": False, "kernel": True}
  with pytest.raises(ValueError, match="min_ndim"):
    labels.mask_by_ndim(-1)


def test_partition_by_multiplier_scales_each_leaf_and_schedules():
  params = {"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}}
  multiplier_of = lambda path, _: 3.0 if labels.path_str(path) == "a" else 1.0
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  for lr, expected in ((0.1, 0.1), (schedule, 1.0)):  # the schedule's value at count 0
    tx = labels.partition_by_multiplier(optax.sgd, lr, multiplier_of, [1.0, 3.0])
    updates, _ = tx.update(params, tx.init(params))
    assert jnp.allclose(updates["a"], -3.0 * expected) and jnp.allclose(updates["b"]["c"], -expected)
  with pytest.raises(ValueError, match="'a' has learning-rate multiplier 3.0, not one of the declared"):
    tx = labels.partition_by_multiplier(optax.sgd, 0.1, multiplier_of, [1.0])
    tx.init(params)

"""Cautious weight decay: the update-sign mask, chaining, equality with optax where they coincide."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax.optim as lo


def _tree(seed):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"w": jax.random.normal(k[0], (5, 4)), "b": jax.random.normal(k[1], (4,))}


def test_decays_only_where_update_and_parameter_agree_in_sign():
  params, updates = _tree(0), _tree(1)
  out, _ = lo.cautious_weight_decay(0.3).update(updates, optax.EmptyState(), params)
  for u, x, o in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(out)):
    u, x = np.asarray(u), np.asarray(x)
    expected = u + 0.3 * (u * x >= 0) * x
    np.testing.assert_allclose(o, expected, rtol=1e-6)
    assert 0 < (u * x >= 0).mean() < 1  # both kinds of coordinate occur


def test_equals_add_decayed_weights_when_signs_agree_and_identity_when_they_disagree():
  params = _tree(2)
  same = jax.tree.map(lambda x: 0.5 * x, params)
  opposite = jax.tree.map(lambda x: -0.5 * x, params)
  tx = lo.cautious_weight_decay(0.1)
  decayed, _ = optax.add_decayed_weights(0.1).update(same, optax.EmptyState(), params)
  out, _ = tx.update(same, optax.EmptyState(), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, decayed)
  out, _ = tx.update(opposite, optax.EmptyState(), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), out, opposite)


def test_mask_and_chain_with_muon():
  params = {"w": jax.random.normal(jax.random.key(3), (6, 4)), "b": jnp.ones(4)}
  grads = _tree(4) | {"w": jax.random.normal(jax.random.key(5), (6, 4))}
  tx = lo.cautious_weight_decay(0.2, mask={"w": True, "b": False})
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(out["b"], grads["b"])
  chained = optax.chain(lo.scale_by_muon(polar="svd"), lo.cautious_weight_decay(0.2),
                        optax.scale_by_learning_rate(0.1))
  direction = optax.chain(lo.scale_by_muon(polar="svd"))
  w = {"w": params["w"]}
  u, _ = chained.update({"w": grads["w"]}, chained.init(w), w)
  d, _ = direction.update({"w": grads["w"]}, direction.init(w), w)
  d, x = np.asarray(d["w"]), np.asarray(w["w"])
  np.testing.assert_allclose(u["w"], -0.1 * (d + 0.2 * (d * x >= 0) * x), rtol=1e-5, atol=1e-6)


def test_cautious_adamw_without_decay_is_adam():
  params = _tree(6)
  tx, ref = lo.cautious_adamw(0.01, weight_decay=0.0), optax.adam(0.01)
  s, r = tx.init(params), ref.init(params)
  for t in range(3):
    g = _tree(10 + t)
    u, s = tx.update(g, s, params)
    v, r = ref.update(g, r, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, v)


def test_bad_input():
  with pytest.raises(ValueError, match="weight_decay must be >= 0"):
    lo.cautious_weight_decay(-0.1)
  with pytest.raises(ValueError, match="needs the parameters"):
    lo.cautious_weight_decay(0.1).update(_tree(0), optax.EmptyState())

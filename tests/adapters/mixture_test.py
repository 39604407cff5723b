"""The rank-space mixture (CoMoL): per-token routing of the cores, gates, the
official init, and the honest refusal to merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.adapters import mixture


def _adapter(seed=0, **hp):
  base = nnx.Linear(10, 7, rngs=nnx.Rngs(seed))
  base.bias[...] = jax.random.normal(jax.random.key(seed + 1), (7,))
  adapter = lrj.adapters.comol(**hp).build(base, rngs=nnx.Rngs(seed + 2), path="blk/mlp")
  state = nnx.state(adapter, lrj.AdapterParam)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed + 3), len(leaves))
  nnx.update(adapter, jax.tree_util.tree_unflatten(
      treedef, [l + 0.5 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))
  return adapter


@pytest.mark.parametrize("top_k", [None, 2])
def test_each_token_sees_the_update_of_its_own_gates(top_k):
  adapter = _adapter(rank=4, experts=3, alpha=6.0, top_k=top_k)
  x = jax.random.normal(jax.random.key(9), (2, 5, 10))
  y = np.asarray(adapter(x))
  a, b = np.asarray(adapter.comol_a[...]), np.asarray(adapter.comol_b[...])
  cores, router = np.asarray(adapter.comol_cores[...]), np.asarray(adapter.comol_router[...])
  w0, bias = np.asarray(adapter.base.kernel[...]), np.asarray(adapter.base.bias[...])
  for token in np.asarray(x).reshape(-1, 10)[:4]:
    logits = (token @ a) @ router
    keep = np.argsort(logits)[::-1][: (top_k or 3)]
    gates = np.zeros(3)
    gates[keep] = np.exp(logits[keep] - logits[keep].max())
    gates /= gates.sum()
    dw = 1.5 * a @ sum(g * c for g, c in zip(gates, cores)) @ b
    np.testing.assert_allclose(adapter.delta_for_gates(jnp.asarray(gates)), dw, rtol=1e-5, atol=1e-5)
    expected = token @ (w0 + dw) + bias
    row = np.where(np.all(np.isclose(np.asarray(x).reshape(-1, 10), token), axis=1))[0][0]
    np.testing.assert_allclose(y.reshape(-1, 7)[row], expected, rtol=1e-4, atol=1e-4)


def test_gates_are_a_distribution_and_top_k_keeps_k():
  adapter = _adapter(rank=4, experts=5, top_k=2)
  x = jax.random.normal(jax.random.key(4), (3, 10))
  g = np.asarray(adapter.gates(x))
  np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
  assert ((g > 0).sum(-1) == 2).all()
  dense = np.asarray(mixture.route(jnp.ones((1, 4)), jnp.zeros((4, 5)), None))
  np.testing.assert_allclose(dense, np.full((1, 5), 0.2), rtol=1e-6)


def test_dense_forward_restates_the_official_layer():
  # DCDmllm/CoMoL src/mocorelora/layer.py (core_router=True, dropout 0), torch's
  # (out, in) weights written out: lora_A_x = x A_t^T, g = softmax(lora_A_x R_t^T),
  # y = base(x) + s * (lora_A_x @ sum_i g_i C_i) B_t^T.
  adapter = _adapter(seed=3, rank=3, experts=4, alpha=3.0)
  a_t, b_t = np.asarray(adapter.comol_a[...]).T, np.asarray(adapter.comol_b[...]).T
  r_t, cores = np.asarray(adapter.comol_router[...]).T, np.asarray(adapter.comol_cores[...])
  x = np.asarray(jax.random.normal(jax.random.key(5), (2, 3, 10)))
  lora_a_x = x @ a_t.T
  logits = lora_a_x @ r_t.T
  g = np.exp(logits - logits.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  merged_core = np.einsum("btk,krs->btrs", g, cores)
  expected = np.asarray(adapter.base(jnp.asarray(x))) + np.einsum(
      "btr,btrs->bts", lora_a_x, merged_core) @ b_t.T
  np.testing.assert_allclose(adapter(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)


def test_init_follows_the_official_code():
  # reset_parameters: kaiming_uniform_(a=sqrt(5)) on lora_A (r, fan_in) and on each
  # core (r, r), lora_B = 0; the router keeps nn.Linear(r, k)'s default init.
  fan_in, rank, experts = 40, 6, 8
  base = nnx.Linear(fan_in, 7, rngs=nnx.Rngs(0))
  adapter = lrj.adapters.comol(rank=rank, experts=experts).build(base, rngs=nnx.Rngs(1), path="l")
  for leaf, bound in [(adapter.comol_a, 1 / np.sqrt(fan_in)), (adapter.comol_cores, 1 / np.sqrt(rank)),
                      (adapter.comol_router, 1 / np.sqrt(rank))]:
    values = np.abs(np.asarray(leaf[...]))
    assert values.max() <= bound and values.max() > 0.9 * bound
    np.testing.assert_allclose(values.mean(), bound / 2, rtol=0.15)  # mean of |U(-b, b)|
  np.testing.assert_array_equal(adapter.comol_b[...], 0.0)
  assert adapter.comol_cores[...].shape == (experts, rank, rank)
  assert adapter.comol_router[...].shape == (rank, experts)
  # The gates are not uniform at init (the router is random), yet B = 0 gives the base layer.
  x = jax.random.normal(jax.random.key(2), (4, fan_in))
  assert np.ptp(np.asarray(adapter.gates(x)), axis=-1).min() > 0
  np.testing.assert_allclose(adapter(x), base(x), rtol=1e-6, atol=1e-6)
  assert lrj.adapters.comol(rank=3, experts=2).num_params(10, 7) == 3 * 17 + 2 * 9 + 3 * 2
  assert adapter.identity_at_init and not type(adapter).mergeable


def test_merge_is_refused_and_the_model_is_left_alone():
  class Host(nnx.Module):
    def __init__(self):
      self.first = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
      self.second = nnx.Linear(6, 6, rngs=nnx.Rngs(1))

  host = Host()
  lrj.attach(host, [("first", lrj.adapters.lora(rank=2)), ("second", lrj.adapters.comol())],
             rngs=nnx.Rngs(2))
  kernel = np.asarray(host.first.base.kernel[...])
  with pytest.raises(ValueError, match="'second' \\(comol\\) is not mergeable"):
    lrj.merge(host)
  # Nothing was merged, not even the mergeable LoRA before it.
  assert isinstance(host.first, lrj.adapters.Adapter) and not host.first.merged
  np.testing.assert_array_equal(host.first.base.kernel[...], kernel)
  with pytest.raises(ValueError, match="not mergeable"):
    host.second.delta()
  with pytest.raises(ValueError, match="not mergeable"):
    host.second.effective_kernel()


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="top_k=5 exceeds experts=4"):
    lrj.adapters.comol(top_k=5)
  with pytest.raises(ValueError, match="experts must be a positive integer"):
    lrj.adapters.comol(experts=0)

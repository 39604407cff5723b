"""ReLoRA restarts and SwitchLoRA switches: the function is unchanged at the event, and exactly
the intended optimizer-state entries are zeroed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import events
from lowrank_jax.reparam import relora
from lowrank_jax.reparam import switchlora


class Host(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(12, 10, rngs=rngs), nnx.Linear(10, 8, rngs=rngs)])

  def __call__(self, x):
    return self.blocks[1](jax.nn.gelu(self.blocks[0](x)))


def _setup(spec, seed=0):
  model = Host(nnx.Rngs(seed))
  lrj.attach(model, [(r"blocks/\d+", spec)], rngs=nnx.Rngs(seed + 1))
  params = nnx.state(model, lrj.AdapterParam)
  # Non-trivial factors and optimizer moments (every moment entry distinct and non-zero).
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]))
  opt_state = optax.adam(1e-3).init(nnx.state(model, lrj.AdapterParam))
  counter = iter(range(1, 10**6))
  opt_state = jax.tree_util.tree_map(
      lambda v: v + 0.001 * jax.random.uniform(jax.random.key(next(counter)), v.shape, minval=1.0,
                                               maxval=2.0) if v.ndim else v, opt_state)
  x = jax.random.normal(jax.random.key(seed + 3), (5, 12))
  return model, opt_state, x


def _moments(opt_state):
  return opt_state[0].mu, opt_state[0].nu


def _get(tree, *path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree[...])


def test_relora_restart_keeps_function_merges_and_prunes_moments():
  model, opt_state, x = _setup(lrj.adapters.relora(rank=3))
  y = model(x)
  update = [np.asarray(layer.delta_matrix()) for layer in (model.blocks[0], model.blocks[1])]
  w0 = [np.asarray(layer.base.kernel[...]) for layer in (model.blocks[0], model.blocks[1])]
  before = jax.tree_util.tree_map(np.asarray, _moments(opt_state))
  event = relora.ReLoRARestart(every=4, prune_fraction=0.5, seed=3)
  assert [s for s in range(1, 13) if event.due(s)] == [4, 8, 12]
  model, opt_state = event(model, opt_state, 4)
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-5)
  for i, layer in enumerate((model.blocks[0], model.blocks[1])):
    np.testing.assert_allclose(layer.base.kernel[...], w0[i] + update[i], rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(layer.lora_b[...]))
    assert np.any(np.asarray(layer.lora_a[...]))
  for old_tree, new_tree in zip(before, _moments(opt_state)):
    for i in (0, 1):
      for leaf in ("lora_a", "lora_b"):
        old, new = _get(old_tree, "blocks", i, leaf), _get(new_tree, "blocks", i, leaf)
        k = int(round(0.5 * old.size))
        smallest = np.argsort(np.abs(old).reshape(-1), kind="stable")[:k]
        expected = old.reshape(-1).copy()
        expected[smallest] = 0.0
        np.testing.assert_array_equal(new.reshape(-1), expected)
  assert int(opt_state[0].count) == 0


def test_switchlora_switch_keeps_function_and_zeros_only_the_counterparts():
  model, opt_state, x = _setup(lrj.adapters.switchlora(rank=4, candidates=6))
  y = model(x)
  before = jax.tree_util.tree_map(np.asarray, _moments(opt_state))
  factors = [(np.asarray(l.lora_a[...]), np.asarray(l.lora_b[...])) for l in model.blocks]
  pools = [(np.asarray(l.candidates_a[...]), np.asarray(l.candidates_b[...])) for l in model.blocks]
  event = switchlora.SwitchLoRASwitch(every=1, count=2, seed=5)
  model, opt_state = event(model, opt_state, 7)
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-5)
  for i, layer in enumerate(model.blocks):
    a_old, b_old = factors[i]
    a_new, b_new = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    # First event: A columns 0, 1 and B rows 2, 3 (B's pointer starts at r // 2).
    cols = np.flatnonzero(np.any(a_new != a_old, axis=0))
    rows = np.flatnonzero(np.any(b_new != b_old, axis=1))
    np.testing.assert_array_equal(cols, [0, 1])
    np.testing.assert_array_equal(rows, [2, 3])
    # Cyclic candidates: pool entries 0, 1 in, the old vectors back in their place.
    pool_a, pool_b = pools[i]
    np.testing.assert_array_equal(a_new[:, cols], pool_a[:, :2])
    np.testing.assert_array_equal(b_new[rows], pool_b[:2])
    np.testing.assert_array_equal(np.asarray(layer.candidates_a[...])[:, :2], a_old[:, cols])
    np.testing.assert_array_equal(np.asarray(layer.candidates_b[...])[:2], b_old[rows])
    # The moments of the counterparts (B rows 0, 1 and A columns 2, 3) are zeroed, no others.
    for old_tree, new_tree in zip(before, _moments(opt_state)):
      old_b, new_b = _get(old_tree, "blocks", i, "lora_b"), _get(new_tree, "blocks", i, "lora_b")
      expected_b = old_b.copy()
      expected_b[cols] = 0.0
      np.testing.assert_array_equal(new_b, expected_b)
      old_a, new_a = _get(old_tree, "blocks", i, "lora_a"), _get(new_tree, "blocks", i, "lora_a")
      expected_a = old_a.copy()
      expected_a[:, rows] = 0.0
      np.testing.assert_array_equal(new_a, expected_a)


def test_zero_param_state_slices_and_bad_paths():
  params = {"layer": {"w": jnp.ones((3, 4))}, "other": {"w": jnp.ones((3, 4))}}
  state = optax.adam(1e-3).init(params)
  state = jax.tree_util.tree_map(lambda v: v + 1.0, state)
  new = events.zero_param_state_slices(state, ("layer", "w"), (3, 4), [1, 3], axis=1)
  expected = np.ones((3, 4)) * 1.0
  expected[:, [1, 3]] = 0.0
  np.testing.assert_array_equal(new[0].mu["layer"]["w"], expected)
  np.testing.assert_array_equal(new[0].nu["layer"]["w"], expected)
  np.testing.assert_array_equal(new[0].mu["other"]["w"], 1.0)
  with pytest.raises(ValueError, match="No optimizer-state leaf of shape \\(3, 4\\) belongs to the "
                     "parameter 'nope/w'"):
    events.zero_param_state(state, ("nope", "w"), (3, 4))


def test_bad_event_arguments():
  with pytest.raises(ValueError, match="period `every` must be an integer >= 1, got 0"):
    relora.ReLoRARestart(every=0)
  with pytest.raises(ValueError, match="prune_fraction must be in \\[0, 1\\]"):
    relora.ReLoRARestart(prune_fraction=1.5)
  with pytest.raises(ValueError, match="count must be an integer >= 1"):
    switchlora.SwitchLoRASwitch(count=0)
  with pytest.raises(ValueError, match="Unknown arguments \\['period'\\].*accepted"):
    events.build("relora_restart", period=3)


def test_jagged_schedule_rewarms_after_each_restart():
  base = optax.linear_schedule(1.0, 0.5, 100)
  jagged = relora.jagged_schedule(base, every=10, warmup_steps=4)
  counts = np.arange(30)
  got = np.array([float(jagged(c)) for c in counts])
  # Before the first restart (after update 10): the base schedule unchanged.
  np.testing.assert_allclose(got[:10], [float(base(c)) for c in range(10)], rtol=1e-6)
  # Update t >= 10 is p = t mod 10 updates past a restart: factor min(1, (p + 1) / 4).
  for c in range(10, 30):
    factor = min(1.0, (c % 10 + 1) / 4)
    np.testing.assert_allclose(got[c], factor * float(base(c)), rtol=1e-6)
  assert got[10] < got[9] and got[20] < got[19]  # the jag at each restart


def test_jagged_schedule_and_config_errors():
  with pytest.raises(ValueError, match="every must be an integer >= 1"):
    relora.jagged_schedule(optax.constant_schedule(1.0), every=0, warmup_steps=1)
  with pytest.raises(ValueError, match="exceeds the restart period"):
    relora.jagged_schedule(optax.constant_schedule(1.0), every=5, warmup_steps=6)


def test_relora_config_uses_the_jagged_schedule():
  from configs import pretrain_reparam
  from experiments import optimizers
  config = pretrain_reparam.get_config("method=relora,event_every=20,steps=60")
  assert config.optimizer.restart_every == 20 and config.optimizer.restart_warmup_steps == 10
  lr, base = optimizers.schedule(config), optimizers._base_schedule(config)
  np.testing.assert_allclose([float(lr(c)) for c in (19, 20, 21, 29, 30)],
                             [float(base(19)), float(base(20)) / 10, float(base(21)) * 2 / 10,
                              float(base(29)), float(base(30))], rtol=1e-6)
  assert optimizers.schedule(pretrain_reparam.get_config("method=full")).__name__ != "jagged"

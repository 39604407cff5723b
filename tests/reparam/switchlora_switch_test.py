"""SwitchLoRA switching: the official cyclic order, the counterpart freeze, the function kept."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.reparam import switchlora

from lrj_testing import Host


def _model(spec, base=None, seed=0):
  base = nnx.Linear(12, 10, rngs=nnx.Rngs(seed)) if base is None else base
  model = Host(base)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(seed + 1))
  return model


def _adam_state(model):
  return optax.adam(1e-3).init(nnx.state(model, lrj.AdapterParam))


class OfficialLayer:
  """The official continuous switch (switch_lora.py), restated on NumPy vectors.

  ``SwitchLoraLayer._init_candidates``: min(fan_in, fan_out) = N candidate
  slots per factor, slots N - r .. N - 1 in use, B's assignment shifted by
  r // 2, pointers candidate_A_index = 0 and candidate_B_index = r // 2.
  ``SwitchLoraLayer.switch``: the bound ``available_num``, the indices from the
  pointers, ``_select_indices`` (continuous: slot ``selected[first - 1] + 1 +
  j`` mod N), ``_switch_chosen_indices`` (old vector back into its own slot,
  counterpart fixed for adam_warm_step steps); ``correct_switched_lora``
  (gradients of fixed vectors zeroed, counters decremented).
  """

  def __init__(self, lora_a, lora_b, pool_a, pool_b, warm_steps):
    r, m = lora_a.shape[1], pool_a.shape[1]
    n_slots = r + m
    self.r, self.n_slots, self.warm = r, n_slots, warm_steps
    self.a = [lora_a[:, i].copy() for i in range(r)]
    self.b = [lora_b[i].copy() for i in range(r)]
    in_use = list(range(n_slots - r, n_slots))
    self.selected_a = list(in_use)
    self.selected_b = [in_use[i - r // 2] for i in range(r)]
    self.slots_a = [pool_a[:, p].copy() for p in range(m)] + [None] * r
    self.slots_b = [pool_b[p].copy() for p in range(m)] + [None] * r
    for i in range(r):
      self.slots_a[self.selected_a[i]] = self.a[i].copy()
      self.slots_b[self.selected_b[i]] = self.b[i].copy()
    self.index_a, self.index_b = 0, r // 2
    self.fixed_a, self.fixed_b = [0] * r, [0] * r

  def _switch(self, indices, vectors, slots, selected, counterpart_fixed):
    first = selected[indices[0] - 1]  # Python's -1: the last vector when indices[0] == 0
    replace = {idx: (first + 1 + j) % self.n_slots for j, idx in enumerate(indices)}
    for idx in replace:
      slots[selected[idx]] = vectors[idx].copy()
    for idx, dest in replace.items():
      vectors[idx] = slots[dest].copy()
      selected[idx] = dest
      counterpart_fixed[idx] = self.warm

  def step(self, wanted):
    """One training step's switch; returns the A and B indices whose gradient is zeroed."""
    r = self.r
    fixed_a = sum(s > 0 for s in self.fixed_a)
    fixed_b = sum(s > 0 for s in self.fixed_b)
    available = min((self.index_a - fixed_a - self.index_b) % r,
                    (self.index_b - fixed_b - self.index_a) % r)
    n = min(wanted, available)
    if n > 0:
      to_a = [i % r for i in range(self.index_a, self.index_a + n)]
      to_b = [i % r for i in range(self.index_b, self.index_b + n)]
      self.index_a, self.index_b = (self.index_a + n) % r, (self.index_b + n) % r
      self._switch(to_a, self.a, self.slots_a, self.selected_a, self.fixed_b)
      self._switch(to_b, self.b, self.slots_b, self.selected_b, self.fixed_a)
    frozen = ([i for i, s in enumerate(self.fixed_a) if s > 0],
              [i for i, s in enumerate(self.fixed_b) if s > 0])
    self.fixed_a = [max(s - 1, 0) for s in self.fixed_a]
    self.fixed_b = [max(s - 1, 0) for s in self.fixed_b]
    return frozen

  def free_slots(self, selected):
    """The candidate slots not in use, in ring order from the one after the in-use window."""
    start = selected[(self.index_a if selected is self.selected_a else self.index_b) - 1] + 1
    return [(start + j) % self.n_slots for j in range(self.n_slots - self.r)]


def test_cyclic_order_matches_the_official_rule():
  # N = min(8, 10) = 8 slots, r = 5 in use, m = 3 free: both pointers and the pool wrap around.
  freeze = 2
  model = _model(lrj.adapters.switchlora(rank=5), nnx.Linear(8, 10, rngs=nnx.Rngs(3)))
  layer = model.layer
  official = OfficialLayer(*(np.asarray(v[...]) for v in (layer.lora_a, layer.lora_b,
                                                          layer.candidates_a, layer.candidates_b)),
                           warm_steps=freeze)
  opt_state = _adam_state(model)
  wanted = [2, 1, 2, 2, 1, 1, 2] * 4
  switched = []
  for step, count in enumerate(wanted, start=1):
    before = int(layer.switch_count[...])
    event = switchlora.SwitchLoRASwitch(every=1, count=count, freeze_steps=freeze)
    model, opt_state = event(model, opt_state, step)
    frozen_a, frozen_b = official.step(count)
    switched.append(int(layer.switch_count[...]) - before)
    np.testing.assert_array_equal(np.asarray(layer.lora_a[...]), np.stack(official.a, axis=1))
    np.testing.assert_array_equal(np.asarray(layer.lora_b[...]), np.stack(official.b))
    # Our pool, read from its head (switch_count mod m), is the official free ring.
    k, m = int(layer.switch_count[...]), 3
    head = [(k + j) % m for j in range(m)]
    np.testing.assert_array_equal(
        np.asarray(layer.candidates_a[...])[:, head],
        np.stack([official.slots_a[s] for s in official.free_slots(official.selected_a)], axis=1))
    np.testing.assert_array_equal(
        np.asarray(layer.candidates_b[...])[head],
        np.stack([official.slots_b[s] for s in official.free_slots(official.selected_b)]))
    # The vectors frozen for the next optimizer step are the official zeroed-gradient ones.
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(layer.freeze_a[...])), frozen_a)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(layer.freeze_b[...])), frozen_b)
  # The bound and the freeze shaped the run: some events switched nothing, pointers wrapped.
  assert 0 in switched and 2 in switched and sum(switched) > 2 * 5


@pytest.mark.parametrize("selection", ["cyclic", "random"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_switch_keeps_the_function(selection, kind):
  base = (nnx.Linear(12, 10, rngs=nnx.Rngs(0)) if kind == "linear"
          else nnx.Conv(2, 9, kernel_size=(2, 2), rngs=nnx.Rngs(0)))
  model = _model(lrj.adapters.switchlora(rank=4), base)
  x_shape = (3, 12) if kind == "linear" else (2, 5, 5, 2)
  x = jax.random.normal(jax.random.key(7), x_shape)
  opt_state = _adam_state(model)
  layer = model.layer
  vectors = lambda: np.concatenate([np.asarray(layer.lora_a[...]),
                                    np.asarray(layer.candidates_a[...])], axis=1)
  all_a = np.sort(vectors(), axis=1)
  for step in range(1, 9):
    y = model(x)
    a_before = np.asarray(layer.lora_a[...])
    event = switchlora.SwitchLoRASwitch(count=2, selection=selection, freeze_steps=1, seed=3)
    k = int(layer.switch_count[...])
    model, opt_state = event(model, opt_state, step)
    np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-5)
    # Indices walk cyclically in both selections: A columns k, k + 1 (mod r).
    changed = np.flatnonzero(np.any(np.asarray(layer.lora_a[...]) != a_before, axis=0))
    np.testing.assert_array_equal(np.sort(changed), np.sort(np.arange(k, k + 2) % 4))
    # Switching only moves vectors between the factor and its pool.
    np.testing.assert_array_equal(np.sort(vectors(), axis=1), all_a)


def _train(every, total_steps, switch_at):
  """Adam on a regression loss with one switching event at ``switch_at``; factors per step."""
  model = _model(lrj.adapters.switchlora(rank=4))
  event = switchlora.SwitchLoRASwitch(every=every, count=1, stop=switch_at)
  tx = optax.adam(1e-2)
  graphdef, params, rest = nnx.split(model, lrj.AdapterParam, ...)
  opt_state = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (16, 12))
  target = jax.random.normal(jax.random.key(2), (16, 10))

  @jax.jit
  def train_step(params, rest, opt_state):
    def loss(params):
      return jnp.mean((nnx.merge(graphdef, params, rest)(x) - target) ** 2)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  history = []
  for step in range(1, total_steps + 1):
    params, opt_state, grads = train_step(params, rest, opt_state)
    if event.due(step):
      model = nnx.merge(graphdef, params, rest)
      model, opt_state = event(model, opt_state, step)
      _, params, rest = nnx.split(model, lrj.AdapterParam, ...)
    layer = nnx.merge(graphdef, params, rest).layer
    history.append(dict(a=np.asarray(layer.lora_a[...]), b=np.asarray(layer.lora_b[...]),
                        grad_a=np.asarray(grads["layer"]["lora_a"][...]),
                        grad_b=np.asarray(grads["layer"]["lora_b"][...]),
                        due=event.due(step)))
  return history


@pytest.mark.parametrize("every, frozen_steps", [(1, 5), (2, 6)])
def test_frozen_counterpart_does_not_move_then_moves(every, frozen_steps):
  switch_at = every  # the first event, the only one that switches (stop=switch_at)
  history = _train(every, switch_at + frozen_steps + 2, switch_at)
  # The event at switch_at switched A column 0 (freezing b_0) and B row 2 (freezing a_2).
  at_switch = history[switch_at - 1]
  for t in range(switch_at + 1, switch_at + frozen_steps + 1):  # optimizer steps while frozen
    now, prev = history[t - 1], history[t - 2]
    np.testing.assert_array_equal(now["b"][0], at_switch["b"][0])
    np.testing.assert_array_equal(now["a"][:, 2], at_switch["a"][:, 2])
    np.testing.assert_array_equal(now["grad_b"][0], 0.0)
    np.testing.assert_array_equal(now["grad_a"][:, 2], 0.0)
    # The switched vectors and the others train on.
    assert np.all(now["a"][:, 0] != prev["a"][:, 0]) and np.all(now["b"][2] != prev["b"][2])
    assert np.all(now["b"][1] != prev["b"][1])
  after = history[switch_at + frozen_steps]
  assert np.all(after["b"][0] != at_switch["b"][0])
  assert np.all(after["a"][:, 2] != at_switch["a"][:, 2])
  assert np.all(after["grad_b"][0] != 0.0)
  # The event runs past stop exactly until the freeze is released.
  due = [t for t, h in enumerate(history, start=1) if h["due"]]
  assert due[-1] == switch_at + frozen_steps


def test_state_lives_in_buffers_and_a_resumed_run_repeats():
  make = lambda: _model(lrj.adapters.switchlora(rank=4, candidates=3))
  event = switchlora.SwitchLoRASwitch(count=1, selection="random", freeze_steps=1, seed=4)
  whole = make()
  opt_whole = _adam_state(whole)
  for step in range(1, 9):
    whole, opt_whole = event(whole, opt_whole, step)
  first = make()
  opt_first = _adam_state(first)
  for step in range(1, 5):
    first, opt_first = event(first, opt_first, step)
  buffers = nnx.state(first, lrj.AdapterBuffer)
  assert buffers["layer"]["switch_count"][...].dtype == jnp.int32
  assert buffers["layer"]["freeze_a"][...].dtype == jnp.int32
  resumed = make()
  nnx.update(resumed, nnx.state(first))
  for step in range(5, 9):
    resumed, opt_first = event(resumed, opt_first, step)
  assert int(resumed.layer.switch_count[...]) == int(whole.layer.switch_count[...]) == 8
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(resumed)),
                  jax.tree_util.tree_leaves(nnx.state(whole))):
    np.testing.assert_array_equal(a, b)


def test_bad_options():
  with pytest.raises(ValueError, match=r"selection must be one of \('cyclic', 'random'\), got "
                     "'roulette'"):
    switchlora.SwitchLoRASwitch(selection="roulette")
  with pytest.raises(ValueError, match="freeze_steps must be an integer >= 0, got -1"):
    switchlora.SwitchLoRASwitch(freeze_steps=-1)
  with pytest.raises(ValueError, match="freeze_steps must be an integer >= 0, got 2.5"):
    switchlora.SwitchLoRASwitch(freeze_steps=2.5)
  with pytest.raises(ValueError, match="interval=8.0 is below 2 \\* freeze_steps = 10"):
    switchlora.SwitchLoRASwitch(interval=8.0)
  model = _model(lrj.adapters.switchlora(rank=1))
  with pytest.raises(ValueError, match="switchlora_switch at 'layer': rank=1 cannot switch"):
    switchlora.SwitchLoRASwitch()(model, _adam_state(model), 1)

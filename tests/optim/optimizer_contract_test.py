"""The contract every registered optimizer meets, parametrized over `registry.names()`.

Each transform is built with its entry's ``example`` hyperparameters and a
learning rate, then checked on small parameters of its kind:

* 'dense': ``{'layer': {'kernel': (12, 10)}, 'head': {'kernel': (10, 6)}}``;
* 'lora': ``{'site': {'lora_a': (12, 4), 'lora_b': (4, 10)}}`` (W = a @ b).

Checks: jit with a single trace over many steps (across refreshes) while
lowering a least-squares loss; inside ``nnx.Optimizer``; under
``optax.partition`` and ``optax.masked`` next to a bias leaf it does not own;
``optax.inject_hyperparams`` (the learning rate changed without a retrace);
bfloat16 parameters; state bytes equal to the entry's formula.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax.optim  # noqa: F401  (registers the transforms)
from lowrank_jax.optim import labels
from lowrank_jax.optim import registry

NAMES = registry.names()
LEARNING_RATE = 0.02
BATCH = 16

SHAPES = {
    "dense": {"layer": {"kernel": (12, 10)}, "head": {"kernel": (10, 6)}},
    "lora": {"site": {"lora_a": (12, 4), "lora_b": (4, 10)}},
}


def _kind(name):
  return registry.entry(name).params


def _build(name, **overrides):
  hp = dict(registry.entry(name).example)
  learning_rate = hp.pop("learning_rate", LEARNING_RATE)
  hp.update(overrides)
  return registry.get(name, learning_rate=learning_rate, **hp)


def _params(kind, dtype=jnp.float32, with_bias=False):
  shapes = SHAPES[kind]
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  params = jax.tree.map(lambda s: 0.3 * jax.random.normal(next(keys), s), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
  if with_bias:
    params = {**params, "bias": jnp.zeros((10,))}
  return jax.tree.map(lambda p: p.astype(dtype), params)


def _loss_fn(kind):
  """Least squares ``mean((x W - x W*)^2)`` per matrix (W = a @ b for LoRA), + a bias target."""
  key = jax.random.PRNGKey(1)
  if kind == "dense":
    problems = {}
    for i, (site, shape) in enumerate(SHAPES["dense"].items()):
      kx, kw = jax.random.split(jax.random.fold_in(key, i))
      x = jax.random.normal(kx, (BATCH, shape["kernel"][0]))
      problems[site] = (x, x @ jax.random.normal(kw, shape["kernel"]))
    matrices = lambda p: {site: p[site]["kernel"] for site in problems}
  else:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (BATCH, 12))
    problems = {"site": (x, x @ jax.random.normal(kw, (12, 10)))}
    matrices = lambda p: {"site": p["site"]["lora_a"] @ p["site"]["lora_b"]}
  bias_target = jnp.linspace(-1.0, 1.0, 10)

  def loss(params):
    total = 0.0
    for site, w in matrices(params).items():
      x, y = problems[site]
      total += jnp.mean(jnp.square(x @ w.astype(jnp.float32) - y))
    if "bias" in params:
      total += jnp.mean(jnp.square(params["bias"].astype(jnp.float32) - bias_target))
    return total

  return loss


def _step_fn(tx, loss, traces=None):
  def step(params, state):
    if traces is not None:
      traces.append(1)
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value, updates

  return jax.jit(step)


@pytest.mark.parametrize("name", NAMES)
def test_jit_single_trace_and_lowers_least_squares(name):
  kind = _kind(name)
  tx, loss = _build(name), _loss_fn(kind)
  params = _params(kind)
  state = tx.init(params)
  traces = []
  step = _step_fn(tx, loss, traces)
  initial = float(loss(params))
  for _ in range(30):
    params, state, _, _ = step(params, state)
  final = float(loss(params))
  assert len(traces) == 1, f"{name}: update retraced {len(traces)} times"
  assert np.isfinite(final)
  assert final < 0.8 * initial, f"{name}: loss {initial:.4f} -> {final:.4f}"


class _Dense(nnx.Module):
  def __init__(self, rngs):
    self.layer = nnx.Linear(12, 10, use_bias=False, rngs=rngs)
    self.head = nnx.Linear(10, 6, use_bias=False, rngs=rngs)


class _Site(nnx.Module):
  def __init__(self, rngs):
    self.lora_a = nnx.Param(0.3 * jax.random.normal(rngs.params(), (12, 4)))
    self.lora_b = nnx.Param(0.3 * jax.random.normal(rngs.params(), (4, 10)))


class _Lora(nnx.Module):
  def __init__(self, rngs):
    self.site = _Site(rngs)


@pytest.mark.parametrize("name", NAMES)
def test_inside_nnx_optimizer(name):
  kind = _kind(name)
  model = (_Dense if kind == "dense" else _Lora)(nnx.Rngs(0))
  loss = _loss_fn(kind)
  model_loss = lambda m: loss(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  optimizer = nnx.Optimizer(model, _build(name), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(model_loss)(model)
    optimizer.update(model, grads)

  initial = float(model_loss(model))
  for _ in range(5):
    train_step(model, optimizer)
  final = float(model_loss(model))
  assert np.isfinite(final) and final < initial, f"{name}: {initial} -> {final}"


def _own_leaves_rules():
  return [("bias", "other"), (".*", "own")]


def _check_bias_gets_sgd_and_loss_falls(tx, kind, loss):
  """Five steps of ``tx``: the bias (the 'other' leaf) gets plain SGD at 0.1, the loss falls."""
  params = _params(kind, with_bias=True)
  state = tx.init(params)
  step = _step_fn(tx, loss)
  initial = float(loss(params))
  for _ in range(5):
    grads = jax.grad(loss)(params)
    params, state, _, updates = step(params, state)
    np.testing.assert_allclose(updates["bias"], -0.1 * grads["bias"], rtol=1e-6, atol=1e-7)
  assert float(loss(params)) < initial


@pytest.mark.parametrize("name", NAMES)
def test_under_partition(name):
  kind = _kind(name)
  loss = _loss_fn(kind)
  tx = optax.partition({"own": _build(name), "other": optax.sgd(0.1)},
                       labels.label_by_path(_own_leaves_rules()))
  _check_bias_gets_sgd_and_loss_falls(tx, kind, loss)


@pytest.mark.parametrize("name", NAMES)
def test_under_masked(name):
  kind = _kind(name)
  loss = _loss_fn(kind)
  own = lambda p: jax.tree.map(lambda label: label == "own", labels.label_by_path(_own_leaves_rules())(p))
  tx = optax.chain(optax.masked(_build(name), own), optax.masked(optax.sgd(0.1), lambda p: jax.tree.map(
      lambda m: not m, own(p))))
  _check_bias_gets_sgd_and_loss_falls(tx, kind, loss)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
  kind = _kind(name)
  entry = registry.entry(name)
  hp = dict(entry.example)
  hp.pop("learning_rate", None)
  factory = functools.partial(entry.factory, **hp)
  static = [n for n in inspect.signature(entry.factory).parameters if n != "learning_rate"]
  tx = optax.inject_hyperparams(factory, static_args=static)(learning_rate=LEARNING_RATE)
  loss = _loss_fn(kind)
  params = _params(kind)
  state = tx.init(params)
  traces = []
  step = _step_fn(tx, loss, traces)
  params, state, _, updates = step(params, state)
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  _, state, _, updates = step(params, state)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0)
  assert len(traces) == 1, f"{name}: changing the learning rate retraced"


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_params(name):
  kind = _kind(name)
  tx, loss = _build(name), _loss_fn(kind)
  params = _params(kind, jnp.bfloat16)
  state = tx.init(params)
  step = _step_fn(tx, loss)
  for _ in range(4):
    params, state, _, updates = step(params, state)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == jnp.bfloat16 and p.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(p.astype(jnp.float32))))
  for s in jax.tree.leaves(state):
    if jnp.issubdtype(s.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(s.astype(jnp.float32))))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_state_bytes_equal_formula(name, dtype):
  entry = registry.entry(name)
  if entry.state_bytes is None:
    pytest.skip(f"{name} registers no state-bytes formula")
  params = _params(entry.params, dtype)
  state = _build(name).init(params)
  counted = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  hp = dict(entry.example)
  hp.pop("learning_rate", None)
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert counted == entry.state_bytes(shapes, **hp)

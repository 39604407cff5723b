"""AdaPreLoRA: the H-weighted closest factor step (by brute force), Adafactor's statistics
(against optax), O(m + n) state, invariance under regauging, descent, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lrj
from lowrank_jax.optim import adaprelora
from lowrank_jax.optim import registry

from lora_optim_test import _problem  # the LoRA-pair regression problem shared by these tests

N, M, R = 6, 5, 2  # fan_in, fan_out, rank of the tiny brute-force problems


def _random_site(seed, n=N, m=M, r=R):
  k = jax.random.split(jax.random.key(seed), 5)
  a = jax.random.normal(k[0], (n, r))
  b = jax.random.normal(k[1], (r, m))
  g = jax.random.normal(k[2], (n, m))                  # Ĝ: the gradient w.r.t. the product a b
  p = jnp.exp(0.5 * jax.random.normal(k[3], (n,)))
  q = jnp.exp(0.5 * jax.random.normal(k[4], (m,)))
  return a, b, g, p, q


def _jacobian(a, b):
  """The (n m, n r + r m) matrix of (da, db) -> da b + a db, row-major vec."""
  n, r = a.shape
  m = b.shape[1]
  cols = []
  for idx in range(n * r):
    cols.append((jnp.zeros(n * r).at[idx].set(1.0).reshape(n, r) @ b).ravel())
  for idx in range(r * m):
    cols.append((a @ jnp.zeros(r * m).at[idx].set(1.0).reshape(r, m)).ravel())
  return np.asarray(jnp.stack(cols, 1), np.float64)


def _brute_force(a, b, g, p, q):
  """Dense solve of min ||J x - Ĝ/(p q^T)||_H, then the least-imbalance member of the solution set."""
  n, r = a.shape
  a, b, g, p, q = (np.asarray(x, np.float64) for x in (a, b, g, p, q))
  jac = _jacobian(a, b)
  sqrt_h = np.sqrt(np.outer(p, q)).ravel()
  target = (g / np.outer(p, q)).ravel()
  x, *_ = np.linalg.lstsq(sqrt_h[:, None] * jac, sqrt_h * target, rcond=None)
  induced = (jac @ x).reshape(g.shape)
  # Null space of J: every solution is x + null @ y; pick y minimizing ||da b - a db||_H.
  _, sv, vt = np.linalg.svd(jac)
  null = vt[np.sum(sv > 1e-9 * sv[0]):].T
  assert null.shape[1] == r * r

  def imbalance_operator(v):
    da, db = v[:n * r].reshape(n, r), v[n * r:].reshape(r, -1)
    return sqrt_h * (da @ b - a @ db).ravel()

  base = imbalance_operator(x)
  ops = np.stack([imbalance_operator(null[:, k]) for k in range(null.shape[1])], 1)
  y, *_ = np.linalg.lstsq(ops, -base, rcond=None)
  best = x + null @ y
  return induced, best[:n * r].reshape(n, r), best[n * r:].reshape(r, -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factor_step_is_the_h_closest_and_least_imbalanced_solution(seed):
  a, b, g, p, q = _random_site(seed)
  da, db = adaprelora.balanced_factor_step(g @ b.T, a.T @ g, a, b, p, q, delta=0.0)
  induced, da_ref, db_ref = _brute_force(a, b, g, p, q)
  np.testing.assert_allclose(da @ b + a @ db, induced, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(da, da_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-4)
  # The H-projection is not the Frobenius one: with non-uniform weights they differ.
  frob_induced, *_ = _brute_force(a, b, g * np.outer(p, q), np.ones(N), np.ones(M))
  assert np.abs(frob_induced - induced).max() > 1e-2


def test_uniform_weights_give_the_tangent_projection_of_the_gradient():
  a, b, g, _, _ = _random_site(3)
  da, db = adaprelora.balanced_factor_step(g @ b.T, a.T @ g, a, b, jnp.ones(N), jnp.ones(M), 0.0)
  p_a = a @ jnp.linalg.solve(a.T @ a, a.T)
  p_b = b.T @ jnp.linalg.solve(b @ b.T, b)
  np.testing.assert_allclose(da @ b + a @ db, p_a @ g + g @ p_b - p_a @ g @ p_b, rtol=1e-4, atol=1e-4)
  # Least imbalance splits the shared part P_a G P_b equally between the two factors.
  np.testing.assert_allclose(a @ db, p_a @ g - 0.5 * p_a @ g @ p_b, rtol=1e-4, atol=1e-4)


def _tangent(a, b, g):
  p_a = a @ jnp.linalg.solve(a.T @ a, a.T)
  p_b = b.T @ jnp.linalg.solve(b @ b.T, b)
  return p_a @ g + (jnp.eye(a.shape[0]) - p_a) @ g @ p_b


def test_statistics_are_those_of_the_tangent_gradient_and_match_optax_adafactor():
  a, b, _, _, _ = _random_site(4)
  row, col = adaprelora.tangent_moments(*(lambda g: (g @ b.T, a.T @ g))(_random_site(5)[2]), a, b, 0.0)
  t = _tangent(a, b, _random_site(5)[2])
  np.testing.assert_allclose(row, jnp.mean(t ** 2, 1), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(col, jnp.mean(t ** 2, 0), rtol=1e-4, atol=1e-6)
  # Over steps, the state equals optax's factored second moment of the tangent gradients.
  s = 2.0
  params = {"site": {"lora_a": a, "lora_b": b}}
  tx = adaprelora.scale_by_adaprelora(scale=s, delta=1e-9)
  ref = optax.scale_by_factored_rms(min_dim_size_to_factor=1)
  state, ref_state = tx.init(params), ref.init(jnp.zeros((N, M)))
  for step in range(4):
    g = _random_site(10 + step)[2]
    grads = {"site": {"lora_a": g @ b.T, "lora_b": a.T @ g}}
    updates, state = tx.update(grads, state, params)
    ref_step, ref_state = ref.update(_tangent(a, b, g), ref_state, jnp.zeros((N, M)))
  # optax names the statistics by the sizes of the axes: pick the fan_in (N) and fan_out (M) ones.
  ref_in, ref_out = sorted([ref_state.v_row, ref_state.v_col], key=lambda v: v.shape != (N,))
  np.testing.assert_allclose(state.second_moment["site"]["lora_a"], ref_in, rtol=1e-4)
  np.testing.assert_allclose(state.second_moment["site"]["lora_b"], ref_out, rtol=1e-4)
  # ... and the last step is the H-closest factor step for Adafactor's p, q, divided by s.
  p, q = adaprelora.adafactor_factors(ref_in, ref_out)
  np.testing.assert_allclose(_tangent(a, b, g) / jnp.outer(p, q), ref_step, rtol=1e-4, atol=1e-6)
  induced, *_ = _brute_force(a, b, g, p, q)
  step_w = updates["site"]["lora_a"] @ b + a @ updates["site"]["lora_b"]
  np.testing.assert_allclose(s * step_w, induced, rtol=1e-3, atol=1e-4)


def test_state_is_order_fan_in_plus_fan_out():
  n, m, r = 40, 30, 4
  params = {"site": {"lora_a": jnp.ones((n, r)), "lora_b": jnp.ones((r, m))}, "head": jnp.ones((3,))}
  for momentum in (None, 0.9):
    tx = lrj.optim.get("adaprelora", learning_rate=0.1, momentum=momentum)
    state = tx.init(params)
    moments = state[0].second_moment
    assert moments["site"]["lora_a"].shape == (n,) and moments["site"]["lora_b"].shape == (m,)
    assert moments["head"].shape == (0,)
    counted = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert counted == registry.entry("adaprelora").state_bytes(params, momentum=momentum)
  assert registry.entry("adaprelora").state_bytes(params) == 4 + 4 * (n + m)


def _run(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


def _regauge(params):
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(7), (4, 4)))
  n = q @ jnp.diag(jnp.array([0.5, 0.8, 1.3, 2.0]))
  site = params["site"]
  return {"site": {"lora_a": site["lora_a"] @ n, "lora_b": jnp.linalg.solve(n, site["lora_b"])},
          "head": params["head"]}


def _product(params):
  return params["site"]["lora_a"] @ params["site"]["lora_b"]


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_trajectory_is_invariant_under_regauging(momentum):
  params, loss = _problem()
  tx = lrj.optim.get("adaprelora", learning_rate=0.02, scale=2.0, momentum=momentum, delta=1e-9)
  end = _run(tx, params, loss, 10)
  end_gauged = _run(tx, _regauge(params), loss, 10)
  np.testing.assert_allclose(_product(end_gauged), _product(end), rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(end_gauged["head"], end["head"], rtol=1e-5)
  # Plain Adafactor on the factors is not invariant: the same check fails.
  plain = optax.adafactor(0.02, min_dim_size_to_factor=1)
  diff = _product(_run(plain, params, loss, 10)) - _product(_run(plain, _regauge(params), loss, 10))
  assert float(jnp.abs(diff).max()) > 1e-2


@pytest.mark.parametrize("zero_b", [False, True], ids=["random", "lora_init_b0"])
def test_training_lowers_the_loss(zero_b):
  params, loss = _problem(seed=3)
  if zero_b:  # LoRA's own init: b = 0, so the first step moves b only
    params["site"]["lora_b"] = jnp.zeros_like(params["site"]["lora_b"])
  end = _run(lrj.optim.get("adaprelora", learning_rate=0.02, scale=2.0, momentum=0.9), params, loss, 60)
  assert loss(end) < 0.3 * loss(params)
  assert bool(jnp.all(jnp.isfinite(_product(end))))


def test_bad_input():
  params, loss = _problem()
  grads = jax.grad(loss)(params)
  tx = lrj.optim.get("adaprelora", learning_rate=0.1)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, tx.init(params))
  half = {"site": {"lora_a": params["site"]["lora_a"]}}
  with pytest.raises(ValueError, match="site 'site' has \\['lora_a'\\]"):
    tx.init(half)
  for bad in (dict(scale=0.0), dict(decay_rate=-1.0), dict(delta=0.0), dict(eps=-1.0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      lrj.optim.get("adaprelora", learning_rate=0.1, **bad)

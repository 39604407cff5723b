"""Muon, Dion, AuON, MARS-M: the defining math, optax.contrib.muon equality, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optim import orthogonal
import lowrank_jax.optim as lo


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"dense": {"kernel": jax.random.normal(k[0], (8, 5)), "bias": jax.random.normal(k[1], (5,))},
          "wide": jax.random.normal(k[2], (4, 9))}


def _grads(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, params, steps, seed=10):
  state = tx.init(params)
  updates = []
  for t in range(steps):
    u, state = tx.update(_grads(params, seed + t), state, params)
    updates.append(u)
  return updates, state


def _assert_trees_close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol), a, b)


# -- Muon -------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", [
    (dict(), dict()),
    (dict(weight_decay=0.1, beta=0.9), dict(weight_decay=0.1, beta=0.9)),
    (dict(ns_coeffs="dion"), dict(ns_coeffs="dion")),
    (dict(scaling="rms", rms=0.2), dict(consistent_rms=0.2)),
    (dict(nesterov=False, adam_nesterov=False), dict(nesterov=False)),
    (dict(ns_steps=3), dict(ns_steps=3)),
])
def test_muon_equals_optax_contrib_muon(ours, theirs):
  params = _params()
  ours_updates, _ = _run(lo.muon(0.05, **ours), params, steps=4)
  optax_updates, _ = _run(optax.contrib.muon(0.05, **theirs), params, steps=4)
  for a, b in zip(ours_updates, optax_updates):
    _assert_trees_close(a, b)


def _paper_muon_direction(grads, beta):
  """The paper's sum form: M_t = beta M + G, N_t = G + beta M_t, exact polar."""
  m = np.zeros_like(grads[0])
  out = []
  for g in grads:
    m = beta * m + g
    u, _, vt = np.linalg.svd(g + beta * m, full_matrices=False)
    out.append(u @ vt)
  return out


def test_muon_svd_polar_without_bias_correction_is_the_paper_update():
  params = {"w": jnp.zeros((7, 4))}
  grads = [np.asarray(_grads(params, s)["w"]) for s in range(4)]
  tx = lo.scale_by_muon(0.9, bias_correction=False, polar="svd", scaling="none")
  state = tx.init(params)
  expected = _paper_muon_direction(grads, 0.9)
  for g, e in zip(grads, expected):
    u, state = tx.update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(u["w"], e, atol=1e-5)
    np.testing.assert_allclose(u["w"].T @ u["w"], np.eye(4), atol=1e-5)  # orthonormal columns


def test_newton_schulz_cubic_converges_to_the_polar_factor_and_quintic_is_near_orthogonal():
  x = jax.random.normal(jax.random.key(1), (6, 10))
  exact = orthogonal.orthogonalize(x, polar="svd")
  cubic = orthogonal.orthogonalize(x, ns_coeffs=orthogonal.newton_schulz_steps("cubic", 60))
  np.testing.assert_allclose(cubic, exact, atol=1e-4)
  quintic = orthogonal.orthogonalize(x, ns_coeffs=orthogonal.newton_schulz_steps("muon", 5))
  s = np.linalg.svd(np.asarray(quintic), compute_uv=False)
  assert s.min() > 0.6 and s.max() < 1.25, s  # Jordan's non-convergent band
  # Same singular vectors as the exact factor: quintic = U diag(s') V^T.
  u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
  core = u.T @ np.asarray(quintic) @ vt.T
  np.testing.assert_allclose(core, np.diag(np.diag(core)), atol=1e-4)


def test_randomized_polar_is_the_rank_k_polar_factor():
  key_a, key_b = jax.random.split(jax.random.key(2))
  a = jax.random.normal(key_a, (9, 3))
  b = jax.random.normal(key_b, (3, 7))
  x = a @ b  # exactly rank 3
  u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
  low = orthogonal.orthogonalize(x, polar="randomized", rank=3, key=jax.random.key(0))
  np.testing.assert_allclose(low, u[:, :3] @ vt[:3], atol=1e-4)
  full = orthogonal.orthogonalize(jax.random.normal(key_a, (6, 5)), polar="randomized", rank=5,
                                  key=jax.random.key(0))
  np.testing.assert_allclose(full, orthogonal.orthogonalize(jax.random.normal(key_a, (6, 5)),
                                                            polar="svd"), atol=1e-4)
  # Inside the transform: rank-2 updates with unit singular values.
  tx = lo.scale_by_muon(polar="randomized", polar_rank=2, scaling="none")
  params = {"w": jnp.zeros((6, 5))}
  update, _ = tx.update(_grads(params, 3), tx.init(params))
  s = np.linalg.svd(np.asarray(update["w"]), compute_uv=False)
  np.testing.assert_allclose(s[:2], 1.0, atol=1e-4)
  np.testing.assert_allclose(s[2:], 0.0, atol=1e-4)


@pytest.mark.parametrize("scaling,factor", [
    ("max_ratio", np.sqrt(max(1, 9 / 4))), ("ratio", np.sqrt(9 / 4)), ("rms", 0.3 * np.sqrt(9)),
    ("none", 1.0)])
def test_shape_scalings(scaling, factor):
  params = {"w": jnp.zeros((4, 9))}
  g = _grads(params, 4)
  tx = lo.scale_by_muon(polar="svd", scaling=scaling, rms=0.3)
  update, _ = tx.update(g, tx.init(params))
  # The first Nesterov mix with bias correction is a positive multiple of g.
  np.testing.assert_allclose(update["w"], factor * orthogonal.orthogonalize(g["w"], polar="svd"),
                             atol=1e-5)


# -- Dion -------------------------------------------------------------------------
def test_dion_full_rank_fixed_point_is_the_exact_orthonormalized_update():
  g = jax.random.normal(jax.random.key(5), (8, 5))  # (fan_in, fan_out)
  params = {"w": jnp.zeros_like(g)}
  tx = lo.scale_by_dion(rank=5, mu=0.9, scaling="ratio")
  state = tx.init(params)
  # Warm start at the fixed point: Q = right singular vectors of X = G^T (fan_out, fan_in),
  # i.e. the left singular vectors of G.
  u, _, _ = np.linalg.svd(np.asarray(g), full_matrices=False)
  state = state._replace(right={"w": jnp.asarray(u)})
  update, new_state = tx.update({"w": g}, state)
  exact = np.sqrt(5 / 8) * np.asarray(orthogonal.orthogonalize(g, polar="svd"))
  np.testing.assert_allclose(update["w"], exact, atol=1e-5)
  # At full rank the error feedback keeps exactly mu * B.
  np.testing.assert_allclose(new_state.momentum["w"], 0.9 * g, atol=1e-5)


def test_dion_full_rank_converges_to_the_exact_orthonormalized_update_from_random_q():
  key_u, key_v = jax.random.split(jax.random.key(6))
  u = np.linalg.qr(np.asarray(jax.random.normal(key_u, (8, 4))))[0]
  v = np.linalg.qr(np.asarray(jax.random.normal(key_v, (4, 4))))[0]
  g = jnp.asarray(u @ np.diag([4.0, 2.0, 1.0, 0.5]) @ v.T)  # a clear spectral gap
  params = {"w": jnp.zeros_like(g)}
  tx = lo.scale_by_dion(rank=4, mu=0.5, scaling="none")
  state = tx.init(params)
  first, state = tx.update({"w": g}, state)
  assert not np.allclose(first["w"], u @ v.T, atol=1e-3)  # random Q: not yet orthonormal
  for _ in range(40):
    update, state = tx.update({"w": g}, state)
  np.testing.assert_allclose(update["w"], u @ v.T, atol=1e-4)


def _reference_dion(grads_torch_layout, q0, mu, lr, wd, eps=1e-8):
  """microsoft/dion dion_simple.dion_update, transcribed to numpy on X (out, in)."""
  x = np.zeros_like(grads_torch_layout[0])
  m = np.zeros_like(x)
  q = q0
  xs = []
  for g in grads_torch_layout:
    m = m + g
    p, _ = np.linalg.qr(m @ q)
    r = m.T @ p
    m = m - (1 - mu) * p @ r.T
    q = r / (np.linalg.norm(r, axis=0, keepdims=True) + eps)
    fan_out, fan_in = x.shape
    x = x * (1 - wd * lr) - lr * np.sqrt(fan_out / fan_in) * p @ q.T
    xs.append(x)
  return xs


def test_dion_low_rank_matches_the_reference_algorithm():
  params = {"w": jnp.zeros((9, 6))}  # (fan_in, fan_out)
  tx = lo.dion(0.1, rank=2, mu=0.95, weight_decay=0.01)
  state = tx.init(params)
  q0 = np.asarray(state.inner_states["matrix"].inner_state[0].right["w"])
  grads = [_grads(params, 20 + t) for t in range(4)]
  expected = _reference_dion([np.asarray(g["w"]).T for g in grads], q0, 0.95, 0.1, 0.01)
  for g, x_ref in zip(grads, expected):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"].T, x_ref, atol=1e-5)


def test_dion_error_feedback_keeps_what_the_low_rank_update_missed():
  g = jax.random.normal(jax.random.key(7), (10, 7))
  params = {"w": jnp.zeros_like(g)}
  tx = lo.scale_by_dion(rank=2, mu=0.8)
  state = tx.init(params)
  _, new_state = tx.update({"w": g}, state)
  # In the (fan_out, fan_in) reading: B = G^T, M' = B - (1 - mu) P P^T B.
  b = np.asarray(g).T
  p = np.linalg.qr(b @ np.asarray(state.right["w"]))[0]
  expected = b - 0.2 * p @ p.T @ b
  np.testing.assert_allclose(new_state.momentum["w"].T, expected, atol=1e-5)
  assert new_state.right["w"].shape == (10, 2)
  np.testing.assert_allclose(np.linalg.norm(new_state.right["w"], axis=0), 1.0, atol=1e-5)


def test_dion_fractional_rank():
  params = {"w": jnp.zeros((12, 8))}
  state = lo.scale_by_dion(rank=0.25).init(params)
  assert state.right["w"].shape == (12, 2)


# -- AuON and MARS-M --------------------------------------------------------------
def test_auon_matches_the_reference_step():
  params = {"w": jnp.zeros((6, 5))}
  grads = [np.asarray(_grads(params, 30 + t)["w"]) for t in range(3)]
  tx = lo.scale_by_auon(beta=0.9, gamma=1.5)
  state = tx.init(params)
  m = np.zeros((6, 5))
  for g in grads:
    m = m + 0.1 * (g - m)                      # m.lerp_(grad, 1 - beta)
    big_g = g + 0.9 * (m - g)                  # grad.lerp_(m, beta)
    scaled = 1.5 * big_g / (np.linalg.norm(big_g) + 1e-7)
    expected = big_g / (np.sqrt(np.mean(np.cosh(scaled) ** 2)) + 1e-8)
    update, state = tx.update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(update["w"], expected, rtol=1e-5, atol=1e-6)


def test_mars_m_matches_the_reference_step():
  params = {"w": jnp.zeros((4, 7))}
  grads = [3.0 * np.asarray(_grads(params, 40 + t)["w"]) for t in range(3)]
  beta, gamma = 0.95, 0.025
  tx = lo.scale_by_mars_m(beta, gamma)
  state = tx.init(params)
  coeffs = orthogonal.newton_schulz_steps("muon", 5)
  m, last = np.zeros((4, 7)), np.zeros((4, 7))
  for g in grads:
    c = g + gamma * beta / (1 - beta) * (g - last)
    c = c / max(1.0, np.linalg.norm(c))
    m = beta * m + (1 - beta) * c
    x = m.T  # wide orientation
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, cc in coeffs:
      gram = x @ x.T
      x = a * x + (b * gram + cc * gram @ gram) @ x
    expected = 0.2 * np.sqrt(7) * x.T
    last = g
    update, state = tx.update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(update["w"], expected, rtol=1e-4, atol=1e-5)


# -- every method trains ----------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: lo.muon(0.02), lambda: lo.muon(0.02, polar="svd"),
    lambda: lo.muon(0.02, polar="randomized", polar_rank=3), lambda: lo.dion(0.05, rank=3),
    lambda: lo.auon(0.05), lambda: lo.mars_m(0.05), lambda: lo.cautious_adamw(0.05, weight_decay=0.1),
], ids=["muon", "muon_svd", "muon_randomized", "dion", "auon", "mars_m", "cautious_adamw"])
def test_lowers_least_squares_loss(make):
  key_x, key_w, key_n = jax.random.split(jax.random.key(8), 3)
  inputs = jax.random.normal(key_x, (64, 8))
  target_w = jax.random.normal(key_w, (8, 6))
  targets = inputs @ target_w + 0.5
  params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros((6,))}

  def loss(p):
    return jnp.mean((inputs @ p["w"] + p["b"] - targets) ** 2)

  tx = make()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  first = float(loss(params))
  for _ in range(60):
    params, state, _ = step(params, state)
  assert float(loss(params)) < 0.5 * first


def test_inject_hyperparams_changes_the_learning_rate():
  params = _params()
  tx = optax.inject_hyperparams(lo.muon)(learning_rate=0.1)
  state = tx.init(params)
  u1, state = tx.update(_grads(params, 1), state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u2, _ = tx.update(_grads(params, 2), state, params)
  assert float(jnp.abs(u1["wide"]).max()) > 0
  assert float(jnp.abs(u2["wide"]).max()) == 0.0


# -- bad input --------------------------------------------------------------------
def test_bad_input_errors():
  with pytest.raises(ValueError, match="known coefficient sets"):
    lo.muon(0.1, ns_coeffs="quintic_magic")
  with pytest.raises(ValueError, match="ns_steps must be 5"):
    lo.muon(0.1, ns_coeffs="dion", ns_steps=3)
  with pytest.raises(ValueError, match="Unknown polar"):
    lo.muon(0.1, polar="qr")
  with pytest.raises(ValueError, match="Unknown scaling"):
    lo.dion(0.1, scaling="sqrt")
  with pytest.raises(ValueError, match="polar_rank"):
    lo.muon(0.1, polar="randomized")
  with pytest.raises(ValueError, match="beta must be in"):
    lo.muon(0.1, beta=1.5)
  params = {"blocks": {"attn": jnp.zeros((4, 6))}}
  with pytest.raises(ValueError, match=r"rank must be an integer in \[1, min\(fan_in, fan_out\) = 4\].*'blocks/attn'"):
    lo.dion(0.1, rank=5).init(params)
  with pytest.raises(ValueError, match=r"polar_rank=5 exceeds.*'blocks/attn'"):
    lo.muon(0.1, polar="randomized", polar_rank=5).init(params)
  conv = {"conv": {"kernel": jnp.zeros((2, 2, 3, 4))}, "dense": jnp.zeros((4, 4))}
  for make in (lo.muon, lo.dion, lo.auon, lo.mars_m):
    with pytest.raises(ValueError, match=r"'conv/kernel'.*ndim > 2.*mask="):
      make(0.1).init(conv)
  # With a mask the 4-D kernel goes to AdamW.
  state = lo.muon(0.1, mask={"conv": {"kernel": False}, "dense": True}).init(conv)
  assert state is not None
  # The bare direction refuses vectors, naming the path.
  with pytest.raises(ValueError, match=r"'dense/bias' has shape \(5,\)"):
    lo.scale_by_muon().init(_params())

"""FRUGAL: the formula Δ = -lr (P Adam(P^T g) + η sign(g - P P^T g)), its reduction to GaLore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.optim.frugal import frugal
from lowrank_jax.optim.galore import galore

B1, B2, EPS = 0.9, 0.999, 1e-8
PARAMS = {"tall": jnp.zeros((10, 6)), "wide": jnp.zeros((5, 9)), "bias": jnp.zeros((6,))}


def _grads(step):
  keys = jax.random.split(jax.random.PRNGKey(7 + step), 3)
  return {k: jax.random.normal(key, p.shape) for key, (k, p) in zip(keys, sorted(PARAMS.items()))}


def _run(tx, steps):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  out = []
  for step in range(steps):
    u, state = update(_grads(step), state, PARAMS)
    out.append(u)
  return out


def _reference_frugal(steps, rank, period, lr, eta, rule):
  """FRUGAL from the paper and reference code: every T steps P = top-r singular vectors of g
  (on the smaller side) and the projected Adam state is reset (count too); the residual
  g - P P^T g gets sign-SGD (or SGD) with step lr * eta; vectors get plain Adam."""
  state, proj, outputs = {}, {}, []
  for t in range(steps):
    out = {}
    for k, g in _grads(t).items():
      if g.ndim == 2:
        m, n = g.shape
        if t % period == 0:
          u, _, vh = jnp.linalg.svd(g, full_matrices=False)
          proj[k] = vh[:rank].T if m >= n else u[:, :rank]
          state.pop(k, None)
        p = proj[k]
        low = g @ p if m >= n else p.T @ g
      else:
        low = g
      mu, nu, count = state.get(k, (jnp.zeros_like(low), jnp.zeros_like(low), 0))
      mu, nu, count = B1 * mu + (1 - B1) * low, B2 * nu + (1 - B2) * low * low, count + 1
      state[k] = (mu, nu, count)
      direction = (mu / (1 - B1 ** count)) / (jnp.sqrt(nu / (1 - B2 ** count)) + EPS)
      if g.ndim == 2:
        back = (lambda s: s @ p.T) if m >= n else (lambda s: p @ s)
        residual = g - back(low)
        direction = back(direction) + eta * (jnp.sign(residual) if rule == "sign" else residual)
      out[k] = -lr * direction
    outputs.append(out)
  return outputs


@pytest.mark.parametrize("rule", ["sign", "sgd"])
def test_equals_reference_algorithm(rule):
  ours = _run(frugal(0.05, rank=2, refresh_every=3, rule=rule, residual_scale=0.3), 7)
  ref = _reference_frugal(7, rank=2, period=3, lr=0.05, eta=0.3, rule=rule)
  for a, b in zip(ours, ref):
    for k in PARAMS:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["reset", "keep", "rotate"])
def test_zero_residual_step_equals_galore(policy):
  ours = _run(frugal(0.05, rank=2, refresh_every=2, residual_scale=0.0, policy=policy), 5)
  ref = _run(galore(0.05, rank=2, refresh_every=2, policy=policy), 5)
  for a, b in zip(ours, ref):
    for k in PARAMS:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_update_is_full_rank_while_galore_is_rank_r():
  ours = _run(frugal(0.05, rank=2, refresh_every=2), 1)[0]
  ref = _run(galore(0.05, rank=2, refresh_every=2), 1)[0]
  for k in ("tall", "wide"):
    assert np.linalg.matrix_rank(np.asarray(ref[k]), tol=1e-6) == 2
    assert np.linalg.matrix_rank(np.asarray(ours[k]), tol=1e-6) > 2


def test_unknown_rule():
  with pytest.raises(ValueError, match="Unknown FRUGAL residual rule 'lion'.*sign"):
    frugal(0.1, rule="lion")

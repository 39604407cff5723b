"""GaLore and its variants against optax.contrib.galore, a reference of the official algorithm,
and the defining math of the refresh policies, cross-head sharing and the sparse residual."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optim.galore import GaLoreState
from lowrank_jax.optim.galore import galore
from lowrank_jax.optim.galore import galore_plus
from lowrank_jax.optim.galore import scale_by_galore

B1, B2, EPS = 0.9, 0.999, 1e-8


def _grads(params, step):
  keys = jax.random.split(jax.random.PRNGKey(100 + step), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _run(tx, params, steps, grads=_grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for step in range(steps):
    u, state = update(grads(params, step), state, params)
    out.append(u)
  return out, state


PARAMS = {"tall": jnp.zeros((12, 7)), "wide": jnp.zeros((6, 10)), "square": jnp.zeros((8, 8)),
          "bias": jnp.zeros((7,))}


def test_equals_optax_contrib_galore():
  """svd + keep + Adam with the projector on the larger dim is optax.contrib.galore."""
  ours, _ = _run(galore(0.1, rank=3, refresh_every=3, scale=0.5, side="larger"), PARAMS, 7)
  ref, _ = _run(optax.contrib.galore(0.1, rank=3, update_proj_gap=3, scale=0.5), PARAMS, 7)
  for a, b in zip(ours, ref):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


def _reference_galore(params, steps, rank, period, scale, lr):
  """The official GaLore algorithm (galore_torch): for G (m, n), m >= n: P = Vh[:r], R = G P^T,
  back R P; else P = U[:, :r], R = P^T G, back P R; Adam on R (optax's epsilon placement);
  vectors get full Adam. Written from the paper and the reference code, not from ours."""
  mu = {k: None for k in params}
  nu = {k: None for k in params}
  proj = {}
  outputs = []
  for t in range(steps):
    grads = _grads(params, t)
    out = {}
    for k, g in grads.items():
      if g.ndim == 2:
        m, n = g.shape
        if t % period == 0:
          u, _, vh = jnp.linalg.svd(g, full_matrices=False)
          proj[k] = vh[:rank] if m >= n else u[:, :rank]
        low = g @ proj[k].T if m >= n else proj[k].T @ g
      else:
        low = g
      if mu[k] is None:
        mu[k], nu[k] = jnp.zeros_like(low), jnp.zeros_like(low)
      mu[k] = B1 * mu[k] + (1 - B1) * low
      nu[k] = B2 * nu[k] + (1 - B2) * low * low
      direction = (mu[k] / (1 - B1 ** (t + 1))) / (jnp.sqrt(nu[k] / (1 - B2 ** (t + 1))) + EPS)
      if g.ndim == 2:
        direction = scale * (direction @ proj[k] if m >= n else proj[k] @ direction)
      out[k] = -lr * direction
    outputs.append(out)
  return outputs


def test_smaller_side_equals_reference_algorithm():
  ours, _ = _run(galore(0.1, rank=3, refresh_every=3, scale=0.25), PARAMS, 7)
  ref = _reference_galore(PARAMS, 7, rank=3, period=3, scale=0.25, lr=0.1)
  for a, b in zip(ours, ref):
    for k in PARAMS:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_refresh_policies(policy):
  """After the refresh at step 2 (T=2) the Adam moments are kept, reset, or mapped by R = P2^T P1."""
  params = {"left": jnp.zeros((5, 9)), "right": jnp.zeros((9, 5))}
  tx = scale_by_galore(rank=2, refresh_every=2, policy=policy)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(2):
    _, state = update(_grads(params, step), state)
  before = state
  g2 = _grads(params, 2)
  _, after = update(g2, before)
  adam_before, adam_after = before.inner_state, after.inner_state
  for k, side in (("left", "left"), ("right", "right")):
    p1, p2 = before.projector[k], after.projector[k]
    assert not np.allclose(p1, p2)
    s2 = p2.T @ g2[k] if side == "left" else g2[k] @ p2
    mu1, nu1 = adam_before.mu[k], adam_before.nu[k]
    if policy == "keep":
      mu0, nu0 = mu1, nu1
    elif policy == "reset":
      mu0, nu0 = jnp.zeros_like(mu1), jnp.zeros_like(nu1)
    else:
      r = p2.T @ p1
      mu0 = r @ mu1 if side == "left" else mu1 @ r.T
      nu0 = (r * r) @ nu1 if side == "left" else nu1 @ (r * r).T
    np.testing.assert_allclose(adam_after.mu[k], B1 * mu0 + (1 - B1) * s2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adam_after.nu[k], B2 * nu0 + (1 - B2) * s2 * s2, rtol=1e-5, atol=1e-6)
  assert int(adam_after.count) == (1 if policy == "reset" else 3)


def test_rotate_makes_sign_flipped_bases_harmless():
  """On a constant rank-r gradient a randomized SVD finds U_r up to column signs at each refresh;
  with 'rotate' the updates equal exact-SVD GaLore's, whose basis does not change."""
  g = jax.random.normal(jax.random.PRNGKey(0), (14, 2)) @ jax.random.normal(jax.random.PRNGKey(1), (2, 9))
  params = {"w": jnp.zeros((14, 9))}
  constant = lambda params, step: {"w": g}
  exact, _ = _run(scale_by_galore(rank=2, refresh_every=1), params, 6, constant)
  rotated, _ = _run(scale_by_galore(rank=2, refresh_every=1, strategy="randomized", policy="rotate",
                                           niter=1), params, 6, constant)
  for a, b in zip(exact, rotated):
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-4, atol=1e-5)


def test_galore_plus_shares_one_projector_across_heads():
  params = {"query": jnp.zeros((12, 3, 4))}  # (d, heads, head_dim)
  flat = {"query": jnp.zeros((12, 12))}
  shared, state = _run(galore_plus(0.1, rank=3, refresh_every=2, niter=1), params, 4)
  assert state[0].projector["query"].shape == (12, 3)  # one P of the model dim for all heads
  as_matrix = lambda params, step: {"query": _grads({"query": jnp.zeros((12, 3, 4))}, step)["query"].reshape(12, 12)}
  # The same strategy and seed on the (d, heads * head_dim) matrix, projector on the left.
  ref, _ = _run(optax.chain(scale_by_galore(3, 2, strategy="randomized", side="left", niter=1),
                            optax.scale_by_learning_rate(0.1)), flat, 4, as_matrix)
  for a, b in zip(shared, ref):
    np.testing.assert_allclose(a["query"].reshape(12, 12), b["query"], rtol=1e-5, atol=1e-6)


def test_sparse_residual_adds_top_entries_of_the_residual():
  params = {"w": jnp.zeros((10, 8))}
  kw = dict(rank=2, refresh_every=5, niter=1)
  with_res, state = _run(galore_plus(0.1, residual_density=0.25, residual_scale=0.5, **kw), params, 1)
  without, _ = _run(galore_plus(0.1, **kw), params, 1)
  g = _grads(params, 0)["w"]
  p = state[0].projector["w"]  # right side: P (8, 2)
  rest = np.asarray(g - g @ p @ p.T)
  k = int(np.ceil(0.25 * rest.size))
  kept = np.where(np.abs(rest) >= np.sort(np.abs(rest).ravel())[-k], rest, 0.0)
  np.testing.assert_allclose(with_res[0]["w"] - without[0]["w"], -0.1 * 0.5 * kept, atol=1e-5)
  assert np.count_nonzero(kept) == k


def test_flora_transfers_momentum_on_resampling():
  """Flora: EMA momentum in random coordinates; at a resampling it is mapped by P_new^T P_old."""
  params = {"w": jnp.zeros((6, 11))}
  tx = scale_by_galore(rank=3, refresh_every=2, strategy="random", policy="rotate",
                              inner=optax.ema(0.9, debias=False))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(2):
    _, state = update(_grads(params, step), state)
  g2 = _grads(params, 2)["w"]
  u, after = update({"w": g2}, state)
  p1, p2 = state.projector["w"], after.projector["w"]  # left side: P (6, 3)
  momentum = 0.9 * (p2.T @ p1) @ state.inner_state.ema["w"] + 0.1 * (p2.T @ g2)
  np.testing.assert_allclose(after.inner_state.ema["w"], momentum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(u["w"], p2 @ momentum, rtol=1e-5, atol=1e-6)


def test_weight_decay_is_decoupled_in_full_space():
  params = {"w": jnp.ones((6, 4))}
  g = {"w": jnp.zeros((6, 4))}
  tx = galore(0.1, rank=2, weight_decay=0.5)
  u, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -0.1 * 0.5 * np.ones((6, 4)), atol=1e-7)


def test_rank_rules_by_path_inside_nnx_optimizer():
  """nnx.Optimizer initializes with Variables ('layer/kernel/value') and updates with arrays
  ('layer/kernel'); rules see the same path in both."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layer = nnx.Linear(12, 8, rngs=rngs)
      self.head = nnx.Linear(8, 4, rngs=rngs)

  model = Model(nnx.Rngs(0))
  tx = galore(0.01, rank=[("layer/kernel", 3), ("head/kernel", None)], refresh_every=2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((2, 12))
  loss = lambda m: jnp.sum(jnp.square(m.head(m.layer(x)) - 1.0))
  before = float(loss(model))
  for _ in range(3):
    optimizer.update(model, nnx.grad(loss)(model))
  assert float(loss(model)) < before
  projector = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
  state = next(s for s in projector if isinstance(s, GaLoreState))
  shapes = [np.shape(p) for p in jax.tree.leaves(state.projector)]
  assert shapes == [(8, 3)]  # layer/kernel (12, 8): P on the smaller side; head not projected


def test_rotate_rejects_inner_state_of_another_shape():
  tx = scale_by_galore(rank=2, refresh_every=1, policy="rotate",
                              inner=optax.scale_by_factored_rms(min_dim_size_to_factor=2))
  params = {"w": jnp.zeros((9, 6))}
  with pytest.raises(ValueError, match=r"rotate.*\(9, 2\).*'w'.*factored"):
    tx.update(_grads(params, 0), tx.init(params))

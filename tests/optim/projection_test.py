"""The projector: orthonormality, what each strategy selects, refresh cadence, sides, rules, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import linalg
from lowrank_jax.optim.galore import galore
from lowrank_jax.optim.galore import scale_by_galore
from lowrank_jax.optim import projection


def _grad(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _plan(projector, shape, path="w"):
  return projector.plan({path: jnp.zeros(shape)})[path]


def _refreshed(projector, g, count=0):
  pl = _plan(projector, g.shape)
  state = projector.init_leaf(pl, jnp.float32)
  refresh = jax.jit(lambda s, g, c: projector.refresh(pl, s, g, c, 0))
  return pl, refresh(state, g, jnp.asarray(count, jnp.int32))


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
@pytest.mark.parametrize("strategy,distribution", [
    ("svd", "gaussian"), ("randomized", "gaussian"), ("dct", "gaussian"), ("random", "orthogonal"),
    ("online_pca", "gaussian")])
def test_projector_is_orthonormal(shape, strategy, distribution):
  projector = projection.Projector(rank=3, strategy=strategy, distribution=distribution)
  pl, state = _refreshed(projector, _grad(shape))
  p = np.asarray(projector.basis(pl, state))
  assert p.shape == (min(shape), 3)
  np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)


def test_gaussian_random_projector_is_unbiased_not_orthonormal():
  projector = projection.Projector(rank=4, strategy="random", distribution="gaussian")
  pl = _plan(projector, (9, 30))
  state = projector.init_leaf(pl, jnp.float32)
  sample = jax.jit(jax.vmap(lambda i: projector.refresh(pl, state, _grad((9, 30)), jnp.asarray(0), i)))
  samples = np.asarray(sample(jnp.arange(400)))
  mean_ppt = np.mean(samples @ samples.transpose(0, 2, 1), axis=0)
  np.testing.assert_allclose(mean_ppt, np.eye(9), atol=0.15)  # E[P P^T] = I (Flora)
  assert not np.allclose(samples[0].T @ samples[0], np.eye(4), atol=0.1)


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_svd_projection_is_the_best_rank_r_approximation(shape):
  g = _grad(shape)
  projector = projection.Projector(rank=3, strategy="svd")
  pl, state = _refreshed(projector, g)
  approx = projector.back(pl, state, projector.project(pl, state, g))
  u, s, vt = np.linalg.svd(np.asarray(g), full_matrices=False)
  np.testing.assert_allclose(approx, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)


def test_randomized_recovers_an_exactly_low_rank_gradient():
  a, b = _grad((20, 3), 1), _grad((3, 15), 2)
  g = a @ b
  projector = projection.Projector(rank=3, strategy="randomized", niter=1, oversample=2)
  pl, state = _refreshed(projector, g)
  np.testing.assert_allclose(projector.back(pl, state, projector.project(pl, state, g)), g, atol=1e-4)


@pytest.mark.parametrize("shape", [(16, 9), (9, 16)])
def test_dct_selects_best_aligned_columns_and_projects_onto_them(shape):
  g = _grad(shape, 3)
  projector = projection.Projector(rank=4, strategy="dct")
  pl, idx = _refreshed(projector, g)
  assert idx.dtype == jnp.int32 and idx.shape == (4,)
  gt = np.asarray(g) if pl.side == "left" else np.asarray(g).T
  q = np.asarray(linalg.dct_matrix(pl.dim)).T  # orthonormal basis columns
  scores = np.linalg.norm(q.T @ gt, axis=1)
  np.testing.assert_array_equal(np.sort(np.asarray(idx)), np.sort(np.argsort(-scores)[:4]))
  p = q[:, np.asarray(idx)]
  np.testing.assert_allclose(projection.dct_columns(idx, pl.dim), p, atol=1e-5)
  expected = p @ p.T @ gt
  expected = expected if pl.side == "left" else expected.T
  np.testing.assert_allclose(projector.back(pl, idx, projector.project(pl, idx, g)), expected, atol=1e-5)


def test_online_pca_step_lowers_the_subspace_loss():
  g = _grad((15, 10))
  p0 = linalg.orthonormalize(_grad((15, 3), 5))
  loss = lambda p: float(jnp.sum(jnp.square(g - p @ (p.T @ g))) / jnp.sum(g * g))
  p1 = jax.jit(projection.online_pca_step)(p0, g, 0.1)
  assert loss(p1) < loss(p0)


def test_online_pca_starts_from_the_svd_and_moves_every_step():
  projector = projection.Projector(rank=3, strategy="online_pca", online_lr=0.1)
  g = _grad((10, 15))
  pl, p0 = _refreshed(projector, g, count=0)
  u = np.linalg.svd(np.asarray(g), full_matrices=False)[0][:, :3]
  np.testing.assert_allclose(np.abs(u.T @ np.asarray(p0)), np.eye(3), atol=1e-5)
  p1 = jax.jit(lambda p, g: projector.refresh(pl, p, g, jnp.asarray(1), 0))(p0, _grad((10, 15), 1))
  expected = jax.jit(projection.online_pca_step)(p0, _grad((10, 15), 1), 0.1)
  np.testing.assert_allclose(p1, expected, atol=1e-6)
  assert not np.allclose(p1, p0)


@pytest.mark.parametrize("strategy", ["svd", "randomized", "dct", "random"])
def test_refresh_cadence(strategy):
  """P changes exactly at steps 0, T, 2T (T=3) inside the jitted transform."""
  tx = scale_by_galore(rank=2, refresh_every=3, strategy=strategy)
  params = {"w": jnp.zeros((8, 6))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  basis = np.asarray(linalg.dct_matrix(6)).T
  history = []
  for step in range(8):
    # Gradients aligned with DCT columns {step, step + 1} (mod 6), so every strategy's choice changes.
    g = basis[:, [step % 6, (step + 1) % 6]] @ np.asarray(_grad((2, 8), 10 + step))
    _, state = update({"w": jnp.asarray(g.T)}, state)
    history.append(np.asarray(state.projector["w"]))
  changed = [step for step in range(1, 8) if not np.array_equal(history[step], history[step - 1])]
  assert changed == [3, 6]
  assert np.any(history[0] != 0)


def test_side_rule():
  def side(shape, rule):
    return _plan(projection.Projector(rank=2, side=rule), shape).side

  assert side((12, 7), "smaller") == "right" and side((7, 12), "smaller") == "left"
  assert side((12, 7), "larger") == "left" and side((7, 12), "larger") == "right"
  assert side((8, 8), "smaller") == "right" and side((8, 8), "larger") == "left"
  assert side((7, 12), "right") == "right"
  pl = _plan(projection.Projector(rank=2), (12, 7))
  assert pl.dim == 7 and pl.low_rank_shape == (12, 2)


def test_rank_rules_row_axes_and_shared_heads():
  params = {"attn": {"query": jnp.zeros((12, 2, 5))}, "mlp": {"kernel": jnp.zeros((12, 20))},
            "out": {"kernel": jnp.zeros((2, 5, 12))}, "bias": jnp.zeros((12,))}
  projector = projection.Projector(rank=[("attn/.*", 3), ("mlp/.*", 4), ("out/.*", None)], row_axes=1,
                                   share_heads=True)
  plans = projector.plan(params)
  assert plans["attn"]["query"].rank == 3 and plans["attn"]["query"].side == "left"
  assert (plans["attn"]["query"].rows, plans["attn"]["query"].cols) == (12, 10)
  assert plans["mlp"]["kernel"].rank == 4 and plans["mlp"]["kernel"].side == "left"
  assert not plans["out"]["kernel"].projected and not plans["bias"].projected
  heads_last = projection.Projector(rank=3, row_axes=2, share_heads=True).plan({"o": params["out"]["kernel"]})
  assert heads_last["o"].side == "right" and heads_last["o"].dim == 12


def test_bad_input_errors_name_the_parameter():
  params = {"blocks": {"0": {"kernel": jnp.zeros((6, 4))}}}
  with pytest.raises(ValueError, match=r"blocks/0/kernel.*\[1, 4\]"):
    projection.Projector(rank=5).plan(params)
  with pytest.raises(ValueError, match=r"conv/kernel.*ndim 4.*row_axes"):
    projection.Projector(rank=2).plan({"conv": {"kernel": jnp.zeros((2, 2, 3, 4))}})
  with pytest.raises(ValueError, match="matches no parameter"):
    projection.Projector(rank=[("attn/.*", 2)]).plan(params)
  with pytest.raises(ValueError, match="Unknown projection strategy 'qr'.*svd"):
    projection.Projector(strategy="qr")
  with pytest.raises(ValueError, match="Unknown projection side"):
    projection.Projector(side="top")
  with pytest.raises(ValueError, match="refresh_every must be an integer >= 1"):
    projection.Projector(refresh_every=0)
  with pytest.raises(ValueError, match="Unknown refresh policy 'drop'.*keep"):
    scale_by_galore(policy="drop")
  with pytest.raises(ValueError, match="reset.*online_pca"):
    scale_by_galore(strategy="online_pca", policy="reset")
  tx = galore(0.1, rank=5)
  with pytest.raises(ValueError, match="blocks/0/kernel"):
    tx.init(params)

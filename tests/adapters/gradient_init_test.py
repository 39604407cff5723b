"""Gradient inits of LoRA (LoRA-GA, LoRA-One, GoRA) and GoRA's rank allocation."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import calibrate
from lowrank_jax.adapters import gora
from lowrank_jax.adapters import init as lora_init


class Parallel(nnx.Module):
  """Independent linear maps, each fit to its own target: G_l = 0 where the target is W0_l."""

  def __init__(self, dims, rngs):
    self.layers = nnx.List([nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs) for d_in, d_out in dims])

  def __call__(self, xs):
    return [layer(x) for layer, x in zip(self.layers, xs)]


DIMS = [(16, 12), (16, 12), (20, 8), (12, 16)]


def _task(true_ranks, seed=0):
  model = Parallel(DIMS, nnx.Rngs(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 32))
  updates = []
  for (d_in, d_out), r in zip(DIMS, true_ranks):
    u = jax.random.normal(next(keys), (d_in, r)) if r else jnp.zeros((d_in, 0))
    v = jax.random.normal(next(keys), (r, d_out)) if r else jnp.zeros((0, d_out))
    updates.append(u @ v / 4.0)
  def batch(key):
    ks = jax.random.split(key, len(DIMS))
    return [jax.random.normal(k, (64, d_in)) for k, (d_in, _) in zip(ks, DIMS)]
  batches = [batch(next(keys)) for _ in range(2)]
  targets = [np.asarray(layer.kernel[...]) + u for layer, u in zip(model.layers, updates)]

  def loss_fn(model, xs):
    outs = model(xs)
    return sum(jnp.mean((o - x @ (t)) ** 2) for o, x, t in zip(outs, xs, targets))

  return model, loss_fn, batches


RULES = [(r"layers/\d", lrj.adapters.lora(rank=4, alpha=8.0, init="gora"))]


def test_gora_ranks_respect_budget_and_concentrate_on_updated_layers():
  model, loss_fn, batches = _task([3, 0, 2, 0])
  stats = calibrate.collect(model, RULES, loss_fn, batches)
  assert float(jnp.abs(stats["layers/1"].grad).max()) == 0.0
  rules = gora.allocate(model, stats, RULES)
  ranks = {pattern.replace("\\", ""): spec.rank for pattern, spec in rules}
  features = {f"layers/{i}": d_in + d_out for i, (d_in, d_out) in enumerate(DIMS)}
  budget = 4 * sum(features.values())
  used = sum(ranks[p] * features[p] for p in ranks)
  assert used <= budget
  assert budget - used < min(features.values())  # no further rank fits
  assert ranks["layers/1"] == ranks["layers/3"] == 1  # min_rank where G = 0
  assert ranks["layers/0"] > 4 and ranks["layers/2"] > 4
  # The scale stays alpha / r_ref = 2 (static scaling), and gamma / alpha is kept.
  for _, spec in rules:
    assert spec.scale == pytest.approx(2.0)
    assert spec.init_gamma / spec.alpha == pytest.approx(0.02 / 8.0)
  # An explicit budget is respected too, and attach builds the allocated adapters.
  rules = gora.allocate(model, stats, RULES, budget=3 * sum(features.values()), max_rank=6)
  assert sum(s.rank * features[p.replace("\\", "")] for p, s in rules) <= 3 * sum(features.values())
  assert max(s.rank for _, s in rules) <= 6
  lrj.attach(model, rules, rngs=nnx.Rngs(0), calibration=stats)
  assert [model.layers[i].lora_a.shape[1] for i in range(4)] == [s.rank for _, s in rules]


def test_gora_bad_input():
  model, loss_fn, batches = _task([1, 0, 1, 0])
  stats = calibrate.collect(model, RULES, loss_fn, batches)
  total = sum(d_in + d_out for d_in, d_out in DIMS)
  with pytest.raises(ValueError, match="smaller than min_rank"):
    gora.allocate(model, stats, RULES, budget=total - 1)
  gora.allocate(model, stats, RULES, budget=total)  # exactly one rank per layer fits
  with pytest.raises(ValueError, match="another model"):
    gora.allocate(model, {"layers/0": stats["layers/0"]}, RULES)
  wrong = dict(stats, **{"layers/0": calibrate.SiteStats(grad=jnp.zeros((3, 3)))})
  with pytest.raises(ValueError, match="another model"):
    gora.allocate(model, wrong, RULES)
  with pytest.raises(ValueError, match="importance_kind"):
    gora.allocate(model, stats, RULES, importance_kind="entropy")
  with pytest.raises(ValueError, match="LoRA-family"):
    gora.allocate(model, stats, [(r"layers/\d", lrj.adapters.stella(rank=2))])


def _attach_single(init, compensate=None, rank=3, alpha=6.0, seed=0):
  model, loss_fn, batches = _task([8, 0, 2, 0], seed=seed)
  rules = [("layers/0", lrj.adapters.lora(rank=rank, alpha=alpha, init=init, compensate=compensate))]
  stats = calibrate.collect(model, rules, loss_fn, batches)
  w0 = np.asarray(model.layers[0].kernel[...])
  x = batches[0]
  y0 = model(x)[0]
  lrj.attach(model, rules, rngs=nnx.Rngs(seed), calibration=stats)
  return model, stats["layers/0"].grad, w0, x, y0


@pytest.mark.parametrize("init", ["lora_ga", "lora_one", "gora"])
def test_compensated_gradient_inits_start_at_the_base(init):
  model, _, w0, x, y0 = _attach_single(init, compensate=True)
  adapter = model.layers[0]
  assert adapter.identity_at_init
  assert float(jnp.abs(adapter.delta_matrix()).max()) > 0  # B != 0
  np.testing.assert_allclose(model(x)[0], y0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(adapter.base.kernel[...] + adapter.delta_matrix(), w0, atol=1e-5)


@pytest.mark.parametrize("init,compensate", [("lora_ga", False), ("lora_one", None),
                                             ("gora", None)])
def test_uncompensated_gradient_inits_do_not_claim_identity(init, compensate):
  model, _, _, x, y0 = _attach_single(init, compensate=compensate)
  adapter = model.layers[0]
  assert not adapter.identity_at_init
  assert float(jnp.abs(model(x)[0] - y0).max()) > 1e-6  # the layer moved: the claim must be False


def test_gora_init_is_the_projected_gradient_step():
  model, grad, w0, _, _ = _attach_single("gora", rank=3, alpha=6.0)
  adapter = model.layers[0]
  np.testing.assert_array_equal(adapter.base.kernel[...], w0)  # not compensated by default
  a = np.asarray(adapter.lora_a[...], np.float64)
  projector = a @ np.linalg.solve(a.T @ a, a.T)
  # s a b = -(s gamma / alpha) P_a G with s = alpha / r = 2, gamma = 0.02.
  expected = -(2.0 * 0.02 / 6.0) * projector @ np.asarray(grad, np.float64)
  np.testing.assert_allclose(adapter.delta_matrix(), expected, rtol=1e-3, atol=1e-8)


def test_lora_ga_and_lora_one_factors_follow_the_gradient_svd():
  model, grad, w0, _, _ = _attach_single("lora_ga", rank=3)
  adapter = model.layers[0]
  left, sigma, right_t = np.linalg.svd(np.asarray(grad, np.float64))
  c = 12 ** 0.25 / 4.0  # d_out^(1/4) / sqrt(16)
  np.testing.assert_allclose(np.abs(adapter.lora_a[...].T @ left[:, :3]), c * np.eye(3), atol=1e-3)
  np.testing.assert_allclose(np.abs(adapter.lora_b[...] @ right_t[3:6].T), c * np.eye(3), atol=1e-3)
  model, grad, w0, _, _ = _attach_single("lora_one", rank=3)
  adapter = model.layers[0]
  np.testing.assert_array_equal(adapter.base.kernel[...], w0)  # not compensated by default
  left, sigma, right_t = np.linalg.svd(-np.asarray(grad, np.float64))
  best = (left[:, :3] * sigma[:3]) @ right_t[:3] / (128.0 * sigma[0])
  np.testing.assert_allclose(adapter.lora_a[...] @ adapter.lora_b[...], best, rtol=1e-3, atol=1e-7)


def test_gradient_init_errors():
  model, _, _ = _task([1, 0, 1, 0])[:3]
  with pytest.raises(ValueError, match="needs calibration"):
    lrj.attach(model, [("layers/0", lrj.adapters.lora(rank=2, init="gora"))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no site 'layers/0'"):
    lrj.attach(model, [("layers/0", lrj.adapters.lora(rank=2, init="gora"))], rngs=nnx.Rngs(0),
               calibration={"other/0": calibrate.SiteStats(grad=jnp.zeros((16, 12)))})
  with pytest.raises(ValueError, match="another model"):
    lrj.attach(model, [("layers/0", lrj.adapters.lora(rank=2, init="gora"))], rngs=nnx.Rngs(0),
               calibration={"layers/0": calibrate.SiteStats(grad=jnp.zeros((12, 16)))})
  with pytest.raises(ValueError, match="largest rank init='lora_ga'"):
    lrj.attach(model, [("layers/0", lrj.adapters.lora(rank=7, init="lora_ga"))], rngs=nnx.Rngs(0),
               calibration={"layers/0": calibrate.SiteStats(grad=jnp.zeros((16, 12)))})
  with pytest.raises(ValueError, match="apply to the gradient inits"):
    lrj.adapters.lora(init="pissa", compensate=True)
  assert set(lora_init.GRADIENT_INITS) <= set(lora_init.INIT_NAMES)

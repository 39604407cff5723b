"""Math of the three-factor adapter and the methods it configures, on fresh random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.adapters.factored import RampEvent
from lowrank_jax.adapters.factored import set_step
from lowrank_jax.adapters import regularizers
from lowrank_jax.calibrate import SiteStats

FAN_IN, FAN_OUT = 10, 7


def _w(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _attached(spec, fan_in=FAN_IN, fan_out=FAN_OUT, seed=0, calibration=None):
  layer = nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed))
  layer.kernel[...] = jnp.asarray(_w((fan_in, fan_out), seed + 100))
  layer.bias[...] = jnp.asarray(_w((fan_out,), seed + 101))
  original = np.asarray(layer.kernel[...])
  host = nnx.Dict(layer=layer)
  lrj.attach(host, [("layer", spec)], rngs=nnx.Rngs(params=seed + 1, dropout=seed + 2),
             calibration=calibration)
  return host, host["layer"], original


def _randomize(adapter, seed, scale=0.5):
  state = nnx.state(adapter, lrj.AdapterParam)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(adapter, jax.tree_util.tree_unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]))


def _svd(w):
  u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  return u, s, vt


def _grad_leaves(adapter, x):
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, lrj.AdapterParam))(
      adapter)
  return {str(p[-1]): v[...] for p, v in nnx.to_flat_state(grads)}


def _grad_calibration(seed=7):
  return {"layer": SiteStats(grad=jnp.asarray(_w((FAN_IN, FAN_OUT), seed)), num_tokens=1)}


# -- which leaves train ----------------------------------------------------------
TRAINED = {
    "lora_xs": {"core"}, "lora_sb": {"core"}, "svft": {"core"}, "svfit": {"core"},
    "vectorfit": {"core", "bias_delta"}, "sorsa": {"a", "core", "b"},
    "edora": {"core", "magnitude"}, "nlora": {"a", "core", "b"}, "slora": {"a", "core", "b"},
    "inttune": {"core"}, "pmss": {"core"}, "lora_mini": {"core_left", "core_right"},
    "lora_asym": {"b"}, "singlora": {"a"}, "lora_dropout": {"a", "b"}, "capaboost": {"a", "b"},
    "adalora": {"a", "core", "b"},
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_only_the_trainable_factors_get_gradients(name):
  spec = lrj.adapters.get(name)
  calibration = _grad_calibration() if spec.calibration_needs else None
  host, adapter, _ = _attached(spec, calibration=calibration)
  _randomize(adapter, seed=3)
  adapter.eval()
  grads = _grad_leaves(adapter, jnp.asarray(_w((4, FAN_IN), 5)))
  assert set(grads) == TRAINED[name]
  assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())
  # Every other factor is a frozen buffer.
  for leaf in ("a", "b", "core", "core_left", "core_right"):
    value = getattr(adapter, leaf, None)
    if value is not None and leaf not in TRAINED[name]:
      assert isinstance(value, lrj.AdapterBuffer), leaf
  trainable = sum(v.size for v in grads.values())
  assert trainable == spec.num_params(FAN_IN, FAN_OUT)


# -- SVD inits ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sorsa", "svfit", "vectorfit"])
def test_residual_plus_part_is_the_original_weight(name):
  spec = lrj.adapters.get(name, alpha=None)
  _, adapter, w = _attached(spec)
  w_res = np.asarray(adapter.base.kernel[...])
  np.testing.assert_allclose(w_res + np.asarray(adapter.delta_matrix()), w, atol=1e-5)
  u, s, vt = _svd(w)
  r = adapter.a.shape[1]
  np.testing.assert_allclose(w_res, w - (u[:, :r] * s[:r]) @ vt[:r], atol=1e-4)
  # The trainable singular values start at those of W0.
  np.testing.assert_allclose(adapter.core[...], s[:r], rtol=1e-5)


def test_sorsa_scale_is_in_the_residual():
  spec = lrj.adapters.sorsa(rank=3, alpha=6.0)
  _, adapter, w = _attached(spec)
  u, s, vt = _svd(w)
  np.testing.assert_allclose(adapter.base.kernel[...], w - 2.0 * (u[:, :3] * s[:3]) @ vt[:3],
                             atol=1e-4)


def test_lora_xs_factors_are_the_truncated_svd_and_the_update_has_rank_r():
  spec = lrj.adapters.lora_xs(rank=3)
  _, adapter, w = _attached(spec)
  np.testing.assert_array_equal(adapter.base.kernel[...], w)  # no residual
  np.testing.assert_array_equal(adapter.core[...], 0.0)
  u, s, vt = _svd(w)
  # a = U_r S_r (sign per column), b = V_r^T with the same signs.
  np.testing.assert_allclose(np.asarray(adapter.a[...]) @ np.asarray(adapter.b[...]),
                             (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(adapter.a[...], axis=0), s[:3], rtol=1e-5)
  _randomize(adapter, seed=1)
  assert np.linalg.matrix_rank(np.asarray(adapter.delta_matrix()), tol=1e-5) == 3
  assert spec.num_params(4096, 4096) == 9


def test_lora_xs_bottom_uses_the_smallest_singular_triplets():
  _, adapter, w = _attached(lrj.adapters.lora_xs(rank=2, init="svd_bottom"))
  s = _svd(w)[1]
  np.testing.assert_allclose(np.linalg.norm(adapter.a[...], axis=0), s[-2:], rtol=1e-4)


def test_lora_sb_update_from_r_is_the_projected_gradient():
  """One SGD step on R moves W by -lr s^2 a a^T G b^T b (a, b orthonormal, frozen)."""
  calibration = _grad_calibration()
  spec = lrj.adapters.lora_sb(rank=3, alpha=6.0)  # s = 2
  _, adapter, w = _attached(spec, calibration=calibration)
  a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
  np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
  # B, R, A are the truncated SVD of the approximate first update -lr sign(G).
  update = -spec.update_lr * np.sign(np.asarray(calibration["layer"].grad))
  u, s, vt = _svd(update)
  np.testing.assert_allclose(a @ np.asarray(adapter.core[...]) @ b, (u[:, :3] * s[:3]) @ vt[:3],
                             atol=1e-6)
  x = jnp.asarray(_w((6, FAN_IN), 8))
  target = jnp.asarray(_w((6, FAN_OUT), 9))

  def loss_of_output(y):
    return jnp.sum((y - target) ** 2)

  grads = _grad_leaves_with(adapter, lambda m: loss_of_output(m(x)))
  w_before = np.asarray(adapter.effective_matrix())
  lr = 0.01
  adapter.core[...] = adapter.core[...] - lr * grads["core"]
  moved = np.asarray(adapter.effective_matrix()) - w_before
  g = jax.grad(lambda w_: loss_of_output(x @ w_ + adapter.base.bias[...]))(jnp.asarray(w_before))
  expected = -lr * 4.0 * a @ a.T @ np.asarray(g) @ b.T @ b
  np.testing.assert_allclose(moved, expected, rtol=1e-4, atol=1e-6)


def _grad_leaves_with(adapter, loss):
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, lrj.AdapterParam))(adapter)
  return {str(p[-1]): v[...] for p, v in nnx.to_flat_state(grads)}


def test_lora_sb_without_calibration_names_the_layer():
  with pytest.raises(ValueError, match="lora_sb at 'layer' needs calibration"):
    _attached(lrj.adapters.lora_sb())


# -- SVFT sparse cores --------------------------------------------------------------
@pytest.mark.parametrize("core,core_k", [("diagonal", 1), ("banded", 2), ("random", 3)])
def test_svft_update_is_u_m_vt_with_the_pattern(core, core_k):
  spec = lrj.adapters.svft(core=core, core_k=core_k)
  _, adapter, w = _attached(spec)
  k = min(FAN_IN, FAN_OUT)
  _randomize(adapter, seed=4)
  m = np.asarray(adapter.core_matrix())
  np.testing.assert_allclose(adapter.delta_matrix(), np.asarray(adapter.a[...]) @ m @
                             np.asarray(adapter.b[...]), atol=1e-5)
  support = m != 0
  i, j = np.nonzero(support)
  if core == "diagonal":
    assert np.all(i == j) and support.sum() == k
  elif core == "banded":
    assert np.all(np.abs(i - j) <= core_k)
    assert support.sum() == sum(1 for r in range(k) for c in range(k) if abs(r - c) <= core_k)
  else:
    band = sum(1 for r in range(k) for c in range(k) if abs(r - c) <= core_k)
    assert support.sum() == band
  assert spec.num_params(FAN_IN, FAN_OUT) == support.sum()
  # Full SVD: W0 = U S V^T exactly, so the base is untouched and W = U (S + M) V^T.
  u, s, vt = _svd(w)
  np.testing.assert_allclose(np.abs(np.asarray(adapter.a[...]).T @ u), np.eye(k), atol=1e-4)
  # Forward without forming the core equals the dense formula.
  x = _w((3, FAN_IN), 6)
  expected = x @ (w + np.asarray(adapter.delta_matrix())) + np.asarray(adapter.base.bias[...])
  np.testing.assert_allclose(adapter(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)


def test_svft_top_k_picks_the_most_aligned_singular_vector_pairs():
  spec = lrj.adapters.svft(core="top_k", core_k=5)
  _, adapter, w = _attached(spec, fan_in=8, fan_out=8)
  u, _, vt = _svd(w)
  alignment = np.abs(u.T @ vt.T)
  expected = set(map(tuple, np.argwhere(alignment >= np.sort(alignment.ravel())[-5])))
  got = set(zip(np.asarray(adapter.core_rows[...]).tolist(), np.asarray(adapter.core_cols[...]).tolist()))
  assert got == expected


def test_svft_full_rank_update():
  _, adapter, _ = _attached(lrj.adapters.svft())
  _randomize(adapter, seed=2)
  assert np.linalg.matrix_rank(np.asarray(adapter.delta_matrix()), tol=1e-5) == FAN_OUT


def test_sparse_pattern_bad_input_names_the_layer():
  with pytest.raises(ValueError, match="svft at 'layer'.*core_k=50 exceeds the 49 entries"):
    _attached(lrj.adapters.svft(core="top_k", core_k=50), fan_in=7, fan_out=7)
  with pytest.raises(ValueError, match="svft at 'layer'.*square layer"):
    _attached(lrj.adapters.svft(core="top_k", core_k=3))


@pytest.mark.parametrize("name", ["lora_xs", "sorsa", "pmss", "nlora", "edora"])
def test_rank_above_the_layer_dims_names_the_layer(name):
  with pytest.raises(ValueError, match=f"{name} at 'layer': rank=8 exceeds min"):
    _attached(lrj.adapters.get(name, rank=8))


def test_bad_options_are_rejected_with_the_allowed_values():
  with pytest.raises(ValueError, match="core must be one of"):
    lrj.adapters.get("factored", core="sparse")
  with pytest.raises(ValueError, match="core_init='singular' needs an SVD init"):
    lrj.adapters.get("factored", init="kaiming", core_init="singular")
  with pytest.raises(ValueError, match="train must be a tuple"):
    lrj.adapters.get("factored", train=("A",))


# -- Nystrom / skeleton -------------------------------------------------------------
def test_nlora_factors_are_slices_of_w0_and_the_function_changes():
  _, adapter, w = _attached(lrj.adapters.nlora(rank=3))
  np.testing.assert_array_equal(adapter.a[...], w[:, :3])
  np.testing.assert_array_equal(adapter.b[...], w[:3, :])
  np.testing.assert_array_equal(adapter.core[...], w[:3, :3])
  assert not type(adapter).identity_at_init
  np.testing.assert_allclose(adapter.delta_matrix(), w[:, :3] @ w[:3, :3] @ w[:3, :], rtol=1e-5)
  _, kept, w = _attached(lrj.adapters.nlora(rank=3, residual=True))
  assert type(kept).identity_at_init
  x = _w((2, FAN_IN), 1)
  np.testing.assert_allclose(kept(jnp.asarray(x)), x @ w + np.asarray(kept.base.bias[...]),
                             rtol=1e-4, atol=1e-4)


def test_pmss_factors_are_columns_and_rows_of_w0():
  _, adapter, w = _attached(lrj.adapters.pmss(rank=4))
  a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
  for j in range(4):
    assert np.any(np.all(w == a[:, j:j + 1], axis=0))  # a column of W0
    assert np.any(np.all(w == b[j:j + 1, :], axis=1))  # a row of W0
  assert np.linalg.matrix_rank(a) == 4 and np.linalg.matrix_rank(b) == 4
  assert lrj.adapters.pmss(rank=4).num_params(4096, 1024) == 16


def test_lora_mini_update_rank_is_the_inner_rank():
  spec = lrj.adapters.lora_mini(rank=6, core_rank=2)
  _, adapter, _ = _attached(spec)
  _randomize(adapter, seed=3)
  assert np.linalg.matrix_rank(np.asarray(adapter.delta_matrix()), tol=1e-5) == 2
  assert spec.num_params(FAN_IN, FAN_OUT) == 2 * 6 * 2


def test_asymmetric_lora_has_a_frozen_orthonormal_a():
  _, adapter, _ = _attached(lrj.adapters.lora_asym(rank=4))
  a = np.asarray(adapter.a[...])
  assert isinstance(adapter.a, lrj.AdapterBuffer)
  np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)
  assert lrj.adapters.lora_asym(rank=4).num_params(FAN_IN, FAN_OUT) == 4 * FAN_OUT


# -- EDoRA --------------------------------------------------------------------------
def test_edora_forward_is_the_dora_formula_with_a_core():
  spec = lrj.adapters.edora(rank=3)
  _, adapter, w = _attached(spec)
  np.testing.assert_allclose(adapter.magnitude[...], np.linalg.norm(w, axis=0), rtol=1e-5)
  _randomize(adapter, seed=5)
  a, r, b, m = (np.asarray(v[...]) for v in (adapter.a, adapter.core, adapter.b, adapter.magnitude))
  direction = w + a @ r @ b
  w_prime = m * direction / np.linalg.norm(direction, axis=0)
  x = _w((4, FAN_IN), 6)
  expected = x @ w_prime + np.asarray(adapter.base.bias[...])
  np.testing.assert_allclose(adapter(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(adapter.effective_kernel(), w_prime, rtol=1e-5, atol=1e-5)
  assert spec.num_params(FAN_IN, FAN_OUT) == 9 + FAN_OUT


# -- SingLoRA -----------------------------------------------------------------------
@pytest.mark.parametrize("fan_in,fan_out", [(10, 7), (6, 9)])
def test_singlora_update_is_a_times_its_truncated_transpose(fan_in, fan_out):
  spec = lrj.adapters.singlora(rank=3, alpha=6.0)
  _, adapter, _ = _attached(spec, fan_in=fan_in, fan_out=fan_out)
  a = np.asarray(adapter.a[...])
  assert a.shape == (max(fan_in, fan_out), 3)
  np.testing.assert_allclose(adapter.delta_matrix(), 2.0 * a[:fan_in] @ a[:fan_out].T,
                             rtol=1e-5, atol=1e-6)
  assert spec.num_params(fan_in, fan_out) == 3 * max(fan_in, fan_out)


def test_singlora_square_update_is_symmetric_psd():
  _, adapter, _ = _attached(lrj.adapters.singlora(rank=2), fan_in=6, fan_out=6)
  delta = np.asarray(adapter.delta_matrix())
  np.testing.assert_allclose(delta, delta.T, atol=1e-6)
  assert np.linalg.eigvalsh(delta).min() > -1e-6
  assert np.linalg.matrix_rank(delta, tol=1e-6) == 2


def test_singlora_ramp():
  host, adapter, w = _attached(lrj.adapters.singlora(rank=2, ramp_steps=10))
  assert type(adapter).identity_at_init
  np.testing.assert_array_equal(adapter.delta_matrix(), 0.0)
  a = np.asarray(adapter.a[...])
  full = a[:FAN_IN] @ a[:FAN_OUT].T
  event = RampEvent(10)
  assert event.due(4) and not event.due(11)
  event(host, None, 4)
  np.testing.assert_allclose(adapter.delta_matrix(), 0.4 * full, rtol=1e-5, atol=1e-7)
  set_step(host, 25)
  np.testing.assert_allclose(adapter.delta_matrix(), full, rtol=1e-5, atol=1e-7)


# -- masks ----------------------------------------------------------------------------
def test_capaboost_update_is_the_sum_of_masked_copies_and_raises_the_rank():
  spec = lrj.adapters.capaboost(rank=2, mask_copies=3, alpha=2.0)
  _, adapter, _ = _attached(spec, fan_in=12, fan_out=12)
  _randomize(adapter, seed=4)
  a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
  ma, mb = np.asarray(adapter.mask_a[...]), np.asarray(adapter.mask_b[...])
  assert set(np.unique(ma)) <= {0.0, 1.0} and 0.2 < ma.mean() < 0.8
  expected = sum((a * ma[:, 2 * i:2 * i + 2]) @ (b * mb[2 * i:2 * i + 2]) for i in range(3))
  np.testing.assert_allclose(adapter.delta_matrix(), expected, rtol=1e-5, atol=1e-5)
  assert np.linalg.matrix_rank(np.asarray(adapter.delta_matrix()), tol=1e-5) == 6
  assert spec.num_params(12, 12) == 2 * 24  # one LoRA's parameters


def test_lora_dropout_trains_on_random_masks_and_evaluates_the_ensemble_mean():
  spec = lrj.adapters.lora_dropout(rank=3, factor_dropout=0.5, ensemble=3)
  host, adapter, w = _attached(spec)
  _randomize(adapter, seed=6)
  a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
  x = _w((5, FAN_IN), 7)
  bias = np.asarray(adapter.base.bias[...])
  adapter.eval()
  ma, mb = np.asarray(adapter.mask_a[...]), np.asarray(adapter.mask_b[...])
  ensemble = sum((a * ma[:, 3 * i:3 * i + 3] / 0.5) @ (b * mb[3 * i:3 * i + 3] / 0.5)
                 for i in range(3)) / 3
  np.testing.assert_allclose(adapter(jnp.asarray(x)), x @ (w + ensemble) + bias, rtol=1e-4,
                             atol=1e-4)
  adapter.train()
  y1, y2 = np.asarray(adapter(jnp.asarray(x))), np.asarray(adapter(jnp.asarray(x)))
  assert np.abs(y1 - y2).max() > 1e-3  # fresh masks per call
  # Without an ensemble, evaluation uses the plain factors (the masks' expectation).
  _, plain, w = _attached(lrj.adapters.lora_dropout(rank=3, ensemble=0))
  _randomize(plain, seed=6)
  plain.eval()
  np.testing.assert_allclose(plain.delta_matrix(), np.asarray(plain.a[...]) @ np.asarray(
      plain.b[...]), rtol=1e-5, atol=1e-6)


# -- regularizer ------------------------------------------------------------------------
def test_orthogonality_regularizer():
  host, adapter, _ = _attached(lrj.adapters.sorsa(rank=3))
  # SVD factors are orthonormal: zero penalty at init.
  assert float(regularizers.orthogonality(host)) < 1e-5
  _randomize(adapter, seed=8)
  a, b = np.asarray(adapter.a[...], np.float64), np.asarray(adapter.b[...], np.float64)
  expected = (np.linalg.norm(a.T @ a - np.eye(3)) + np.linalg.norm(b @ b.T - np.eye(3)))
  np.testing.assert_allclose(regularizers.orthogonality(host), expected, rtol=1e-5)
  grads = nnx.grad(regularizers.orthogonality, argnums=nnx.DiffState(0, lrj.AdapterParam))(host)
  flat = {str(p[-1]): v[...] for p, v in nnx.to_flat_state(grads)}
  assert float(jnp.abs(flat["a"]).max()) > 0 and float(jnp.abs(flat["b"]).max()) > 0
  with pytest.raises(ValueError, match="no three-factor adapter"):
    regularizers.orthogonality(_attached(lrj.adapters.lora_xs())[0])

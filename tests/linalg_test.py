"""Tests of lowrank_jax.linalg against numpy on fresh random matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import linalg


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# The SVD routines compute in their input's namespace: NumPy in, NumPy out; JAX in, JAX out.
NAMESPACES = {"numpy": np.asarray, "jax": jnp.asarray}
in_each_namespace = pytest.mark.parametrize("as_array", NAMESPACES.values(), ids=NAMESPACES.keys())


def _check_namespace(as_array, *outputs):
  kind = np.ndarray if as_array is np.asarray else jax.Array
  assert all(isinstance(x, kind) for x in outputs), [type(x) for x in outputs]


@pytest.mark.parametrize("shape,k", [((12, 7), 3), ((5, 9), 5), ((8, 8), 1)])
@pytest.mark.parametrize("largest", [True, False])
@in_each_namespace
def test_svd_topk_matches_numpy(shape, k, largest, as_array):
  w = _rand(shape, seed=hash((shape, k, largest)) % 2**32)
  u, s, vt = linalg.svd_topk(as_array(w), k, largest=largest)
  _check_namespace(as_array, u, s, vt)
  nu, ns, nvt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  sel = slice(0, k) if largest else slice(len(ns) - k, len(ns))
  np.testing.assert_allclose(s, ns[sel], rtol=1e-5)
  np.testing.assert_allclose(u @ np.diag(s) @ vt, nu[:, sel] @ np.diag(ns[sel]) @ nvt[sel], atol=1e-4)


def test_svd_topk_rejects_bad_rank():
  with pytest.raises(ValueError, match="rank must be an integer"):
    linalg.svd_topk(np.ones((4, 3), np.float32), 4)
  with pytest.raises(ValueError, match="rank must be an integer"):
    linalg.svd_topk(np.ones((4, 3), np.float32), 0)


@in_each_namespace
def test_randomized_svd_recovers_low_rank_matrix(as_array):
  rng = np.random.default_rng(1)
  left = np.linalg.qr(rng.standard_normal((60, 6)))[0]
  right = np.linalg.qr(rng.standard_normal((40, 6)))[0]
  spectrum = np.array([10.0, 8.0, 5.0, 3.0, 2.0, 1.0])
  w = (left * spectrum) @ right.T + 1e-4 * rng.standard_normal((60, 40))
  u, s, vt = linalg.randomized_svd(as_array(w.astype(np.float32)), 4, key=jax.random.key(3), niter=2)
  _check_namespace(as_array, u, s, vt)
  np.testing.assert_allclose(s, spectrum[:4], rtol=1e-3)
  exact = np.linalg.svd(w)
  best = exact[0][:, :4] @ np.diag(exact[1][:4]) @ exact[2][:4]
  np.testing.assert_allclose(u @ np.diag(s) @ vt, best, atol=1e-3)


@in_each_namespace
def test_randomized_svd_error_falls_with_niter(as_array):
  w = _rand((80, 50), seed=4)  # flat spectrum: the hard case for sketching
  exact = np.linalg.svd(w, compute_uv=False)[:5]
  errors = []
  for niter in (0, 4):
    _, s, _ = linalg.randomized_svd(as_array(w), 5, key=jax.random.key(0), niter=niter, oversample=0)
    errors.append(np.abs(np.asarray(s) - exact).max())
  assert errors[1] < errors[0]


@in_each_namespace
def test_orthonormalize_is_orthonormal_and_spans_input(as_array):
  x = _rand((10, 4), seed=5)
  q = linalg.orthonormalize(as_array(x))
  _check_namespace(as_array, q)
  q = np.asarray(q)
  np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
  # Same column span: projecting x onto span(q) leaves it unchanged.
  np.testing.assert_allclose(q @ (q.T @ x), x, atol=1e-4)
  # Signs fixed: x = q r with r upper triangular and a positive diagonal.
  r = q.T @ x
  np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=1e-5)
  assert np.all(np.diag(r) > 0)


def test_polar_and_newton_schulz():
  x = _rand((6, 9), seed=6)
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  np.testing.assert_allclose(linalg.polar(x), u @ vt, atol=1e-5)
  # The convergent cubic iteration reaches the polar factor of a well-conditioned matrix.
  well = u @ np.diag(np.linspace(1.0, 2.0, 6)) @ vt
  approx = linalg.newton_schulz(well, steps=30, coeffs="cubic")
  np.testing.assert_allclose(approx, u @ vt, atol=1e-4)
  # Muon's coefficients map singular values into a band around 1.
  sv = np.linalg.svd(np.asarray(linalg.newton_schulz(x.T, steps=5)), compute_uv=False)
  assert sv.min() > 0.5 and sv.max() < 1.3


def test_skew_packing_round_trip():
  v = _rand((3, linalg.skew_size(5)), seed=7)
  q = linalg.skew_from_vector(v, 5)
  np.testing.assert_allclose(q, -np.swapaxes(q, -1, -2))
  np.testing.assert_allclose(linalg.skew_to_vector(q), v)


def test_cayley_is_orthogonal_and_neumann_converges():
  q = 0.1 * linalg.skew_from_vector(_rand((linalg.skew_size(6),), seed=8), 6)
  r = np.asarray(linalg.cayley(q))
  np.testing.assert_allclose(r @ r.T, np.eye(6), atol=1e-5)
  eye = np.eye(6)
  np.testing.assert_allclose(r, (eye + q) @ np.linalg.inv(eye - q), atol=1e-5)
  errors = [np.abs(np.asarray(linalg.cayley_neumann(q, k)) - r).max() for k in (1, 2, 4)]
  assert errors[0] > errors[1] > errors[2]
  with pytest.raises(ValueError, match="order"):
    linalg.cayley_neumann(q, 0)


def test_stiefel_projection_is_tangent():
  x = np.linalg.qr(_rand((9, 3), seed=9))[0]
  xi = np.asarray(linalg.stiefel_project(x, _rand((9, 3), seed=10)))
  np.testing.assert_allclose(x.T @ xi + xi.T @ x, np.zeros((3, 3)), atol=1e-5)


def test_dct_matrix_matches_scipy_definition():
  n = 7
  d = np.asarray(linalg.dct_matrix(n))
  np.testing.assert_allclose(d @ d.T, np.eye(n), atol=1e-5)
  x = _rand((n,), seed=11)
  j = np.arange(n)
  expected = np.array([np.sum(x * np.cos(np.pi * (2 * j + 1) * k / (2 * n))) for k in range(n)])
  expected *= np.sqrt(2.0 / n)
  expected[0] /= np.sqrt(2.0)
  np.testing.assert_allclose(d @ x, expected, atol=1e-5)


def test_column_norms():
  w = _rand((5, 3), seed=12)
  np.testing.assert_allclose(linalg.column_norms(jnp.asarray(w, jnp.bfloat16)),
                             np.linalg.norm(w, axis=0), rtol=1e-2)

"""Permuted block-diagonal products and the polar retraction against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lowrank_jax import linalg


def _orthogonal_blocks(k, b, seed):
  rng = np.random.default_rng(seed)
  return np.stack([np.linalg.qr(rng.normal(size=(b, b)))[0] for _ in range(k)]).astype(np.float32)


@pytest.mark.parametrize("k,b", [(1, 6), (3, 4), (4, 2)])
def test_block_diag_matmul_matches_numpy_permutation_matrices(k, b):
  rng = np.random.default_rng(k * 10 + b)
  n = k * b
  blocks = _orthogonal_blocks(k, b, seed=b)
  perm = rng.permutation(n)
  p = np.zeros((n, n), np.float32)
  p[np.arange(n), perm] = 1.0  # (P v)_i = v[perm[i]]
  expected_r = p.T @ scipy.linalg.block_diag(*blocks) @ p
  x = rng.normal(size=(2, 5, n)).astype(np.float32)
  np.testing.assert_allclose(linalg.permuted_block_diag(jnp.asarray(blocks), jnp.asarray(perm)),
                             expected_r, atol=1e-6)
  np.testing.assert_allclose(linalg.block_diag_matmul(jnp.asarray(x), jnp.asarray(blocks),
                                                      jnp.asarray(perm)),
                             x @ expected_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(expected_r @ expected_r.T, np.eye(n), atol=1e-5)
  # Without a permutation it is the plain block-diagonal product.
  np.testing.assert_allclose(linalg.block_diag_matmul(jnp.asarray(x), jnp.asarray(blocks)),
                             x @ scipy.linalg.block_diag(*blocks), rtol=1e-5, atol=1e-5)


def test_block_diag_matmul_rejects_wrong_width():
  with pytest.raises(ValueError, match="cover 6 features but x has 7"):
    linalg.block_diag_matmul(jnp.ones((2, 7)), jnp.ones((3, 2, 2)))


def test_polar_retraction_is_closest_orthonormal_matrix():
  rng = np.random.default_rng(0)
  x = np.linalg.qr(rng.normal(size=(7, 3)))[0]
  xi = 0.3 * rng.normal(size=(7, 3))
  u, _, vt = np.linalg.svd(x + xi, full_matrices=False)
  out = np.asarray(linalg.polar_retraction(jnp.asarray(x), jnp.asarray(xi)))
  np.testing.assert_allclose(out, u @ vt, atol=1e-5)
  np.testing.assert_allclose(out.T @ out, np.eye(3), atol=1e-5)


def test_cayley_neumann_orthogonality_error_falls_with_order():
  # With S = I + Q + ... + Q^k and (I - Q) S = I - Q^{k+1}, a skew Q gives
  # R^T R = (I - (-Q)^{k+1})(I - Q^{k+1}): error ~2 Q^{k+1} for odd k, Q^{2k+2} for even k.
  n = 8
  q = linalg.skew_from_vector(0.1 * jax.random.normal(jax.random.key(0), (linalg.skew_size(n),)), n)
  q64 = np.asarray(q, np.float64)
  errors = {}
  for k in range(1, 7):
    r = np.asarray(linalg.cayley_neumann(q, k), np.float64)
    gram = r.T @ r
    power = np.linalg.matrix_power(q64, k + 1)
    expected = (np.eye(n) - np.linalg.matrix_power(-q64, k + 1)) @ (np.eye(n) - power)
    np.testing.assert_allclose(gram, expected, atol=2e-6)
    errors[k] = np.abs(gram - np.eye(n)).max()
  for parity in ((1, 3, 5), (2, 4, 6)):
    assert all(errors[a] > errors[b] for a, b in zip(parity, parity[1:])), errors
  assert errors[1] > errors[2] > errors[4] > errors[6] and errors[6] < 1e-4 < errors[1]

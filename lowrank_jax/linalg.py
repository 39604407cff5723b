"""Dense linear algebra shared by adapters, reparameterizations and optimizers.

`jax.numpy` (numpy for static index tables and the NumPy forms below); nothing
of lowrank_jax is imported here. Every routine accumulates in float32 (or the
input dtype if wider) and returns arrays in that accumulation dtype; callers
cast back to their parameter dtype.

The SVD routines (`svd_topk`, `orthonormalize`, `randomized_svd`) compute in
the namespace of their input: `jax.numpy` for JAX arrays and tracers, NumPy
for NumPy arrays. The NumPy form runs eagerly through LAPACK with no XLA
compilation, which is how LoRA's weight-aware inits run on a CPU host
(`adapters.init.lora_factors`).

Conventions: a matrix ``w`` has shape (m, n). A truncated SVD returns
``(u, s, vt)`` with ``u`` (m, k), ``s`` (k,) descending, ``vt`` (k, n), so
``u @ diag(s) @ vt`` is the best rank-k approximation (Eckart-Young).
"""

from __future__ import annotations

import functools

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for half/bfloat16/float32 inputs; float64 stays float64."""
  dtype = jnp.dtype(dtype)
  return jnp.promote_types(dtype, jnp.float32)


def namespace(w):
  """NumPy for NumPy arrays, `jax.numpy` for everything else (JAX arrays, tracers)."""
  return np if isinstance(w, np.ndarray) else jnp


def _as_float(w: Array) -> Array:
  w = w if isinstance(w, np.ndarray) else jnp.asarray(w)
  return w.astype(accumulation_dtype(w.dtype))


def _gaussian(key: Array, shape: tuple[int, ...], dtype, xp):
  """Standard normal test matrix: `jax.random.normal` for `jax.numpy`; for NumPy,
  a NumPy generator seeded with the key's data (a different draw of the same law)."""
  if xp is jnp:
    return jax.random.normal(key, shape, dtype=dtype)
  seed = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                    else key)
  return np.random.default_rng(seed.astype(np.uint64)).standard_normal(shape, dtype=dtype)


def _check_matrix(w: Array, name: str = "w") -> None:
  if w.ndim != 2:
    raise ValueError(f"{name} must be a 2-D matrix, got shape {w.shape}.")


def _check_rank(k: int, shape: Sequence[int], what: str = "rank") -> None:
  limit = min(shape)
  if not isinstance(k, int) or k <= 0 or k > limit:
    raise ValueError(
        f"{what} must be an integer in [1, min{tuple(shape)} = {limit}], got {k!r}."
    )


def svd_topk(w: Array, k: int, *, largest: bool = True) -> tuple[Array, Array, Array]:
  """Exact truncated SVD: the top-k (or bottom-k) singular triplets of ``w``.

  Args:
    w: (m, n) matrix.
    k: number of triplets, 1 <= k <= min(m, n).
    largest: True for the k largest singular values (PiSSA), False for the k
      smallest (MiLoRA). Values are returned in descending order either way.

  Returns:
    ``(u, s, vt)`` with shapes (m, k), (k,), (k, n).
  """
  _check_matrix(w)
  _check_rank(k, w.shape)
  u, s, vt = namespace(w).linalg.svd(_as_float(w), full_matrices=False)
  if largest:
    return u[:, :k], s[:k], vt[:k]
  return u[:, -k:], s[-k:], vt[-k:]


def orthonormalize(x: Array) -> Array:
  """Orthonormal basis of the column span of ``x`` (m, k), m >= k, by QR.

  Signs are fixed so that diag(R) >= 0, which makes the result a deterministic
  function of ``x`` (Householder QR alone is only unique up to column signs).
  """
  _check_matrix(x, "x")
  xp = namespace(x)
  q, r = xp.linalg.qr(_as_float(x))
  signs = xp.where(xp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
  return q * signs[None, :]


def randomized_svd(
    w: Array,
    k: int,
    *,
    key: Array,
    niter: int = 2,
    oversample: int = 8,
) -> tuple[Array, Array, Array]:
  """Randomized truncated SVD by subspace (power) iteration.

  Halko, Martinsson & Tropp, "Finding structure with randomness" (2011),
  Algorithms 4.4 + 5.1: sample ``Y = W Omega`` with a Gaussian ``Omega`` of
  ``k + oversample`` columns, orthonormalize, run ``niter`` rounds of
  ``Q <- orth(W orth(W^T Q))``, then take the exact SVD of the small
  ``Q^T W``. Error falls geometrically in ``niter`` with the spectral gap.
  ``niter=k, oversample=0`` is the setting of ``torch.svd_lowrank(q=k)`` that
  PEFT's ``pissa_niter_k`` uses.

  Args:
    w: (m, n) matrix.
    k: target rank, 1 <= k <= min(m, n).
    key: PRNG key for the Gaussian test matrix.
    niter: number of power iterations (>= 0).
    oversample: extra sampled columns (>= 0); clipped so k + oversample <= min(m, n).

  Returns:
    ``(u, s, vt)`` with shapes (m, k), (k,), (k, n).
  """
  _check_matrix(w)
  _check_rank(k, w.shape)
  if niter < 0 or oversample < 0:
    raise ValueError(f"niter and oversample must be >= 0, got {niter}, {oversample}.")
  xp = namespace(w)
  w = _as_float(w)
  m, n = w.shape
  width = min(k + oversample, m, n)
  q = orthonormalize(w @ _gaussian(key, (n, width), w.dtype, xp))
  for _ in range(niter):
    q = orthonormalize(w.T @ q)
    q = orthonormalize(w @ q)
  u_small, s, vt = xp.linalg.svd(q.T @ w, full_matrices=False)
  return (q @ u_small)[:, :k], s[:k], vt[:k]


def polar(x: Array) -> Array:
  """Orthogonal polar factor ``U V^T`` of ``x = U S V^T`` (exact, by SVD).

  The closest matrix with orthonormal columns (or rows, if wide) to ``x`` in
  Frobenius norm; the Stiefel retraction of StelLA and the exact Muon update.
  """
  _check_matrix(x, "x")
  u, _, vt = jnp.linalg.svd(_as_float(x), full_matrices=False)
  return u @ vt


# Quintic Newton-Schulz coefficients (a, b, c) for X <- aX + (bA + cA^2)X, A = XX^T.
NEWTON_SCHULZ_COEFFS = {
    # Jordan et al., Muon (2024): a fast, non-convergent iteration that maps
    # singular values into roughly [0.7, 1.2] in 5 steps.
    "muon": (3.4445, -4.7750, 2.0315),
    # The classical convergent cubic iteration X <- 1.5X - 0.5 X X^T X.
    "cubic": (1.5, -0.5, 0.0),
}


def newton_schulz(
    x: Array,
    *,
    steps: int = 5,
    coeffs: str | tuple[float, float, float] | Sequence[tuple[float, float, float]] = "muon",
    eps: float = 1e-7,
) -> Array:
  """Approximate polar factor of ``x`` by a Newton-Schulz iteration.

  ``X_0 = x / (||x||_F + eps)`` then ``steps`` times ``A = X X^T``,
  ``X <- a X + (b A + c A^2) X``; wide orientation is used internally so that
  ``A`` is the smaller Gram matrix. With ``coeffs='cubic'`` this converges to
  ``polar(x)`` for full-rank ``x``; ``'muon'`` trades convergence for speed.
  ``coeffs`` is a name, one triple (a, b, c) used at every step, or a
  sequence of exactly ``steps`` triples, one per step.
  """
  _check_matrix(x, "x")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if isinstance(coeffs, str):
    if coeffs not in NEWTON_SCHULZ_COEFFS:
      raise ValueError(
          f"Unknown coeffs {coeffs!r}; known: {sorted(NEWTON_SCHULZ_COEFFS)}.")
    coeffs = NEWTON_SCHULZ_COEFFS[coeffs]
  per_step = [tuple(c) for c in coeffs] if isinstance(coeffs[0], (tuple, list)) else [tuple(coeffs)] * steps
  if len(per_step) != steps or any(len(c) != 3 for c in per_step):
    raise ValueError(
        f"coeffs must be one (a, b, c) triple or {steps} triples (one per step), got {coeffs!r}.")
  x = _as_float(x)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  x = x / (jnp.linalg.norm(x) + eps)
  for a, b, c in per_step:
    gram = x @ x.T
    x = a * x + (b * gram + c * (gram @ gram)) @ x
  return x.T if transposed else x


def skew_size(n: int) -> int:
  """Number of free parameters of an n x n skew-symmetric matrix: n(n-1)/2."""
  return n * (n - 1) // 2


def skew_from_vector(v: Array, n: int) -> Array:
  """Skew-symmetric (n, n) matrix Q from its n(n-1)/2 strictly-upper entries.

  Batched over leading axes of ``v``: (..., n(n-1)/2) -> (..., n, n).
  """
  if v.shape[-1] != skew_size(n):
    raise ValueError(
        f"Expected {skew_size(n)} entries for a {n}x{n} skew matrix, got {v.shape[-1]}.")
  # One gather from [0, v, -v] with a static index table, not a scatter into zeros: on XLA's
  # CPU backend the gradient of the scatter form, followed by matrix products of Q, took minutes
  # to compile and crashed for n = 1024.
  table = _skew_gather_table(n)
  source = jnp.concatenate([jnp.zeros(v.shape[:-1] + (1,), v.dtype), v, -v], axis=-1)
  return jnp.take(source, table, axis=-1)


@functools.lru_cache(maxsize=None)
def _skew_gather_table(n: int) -> np.ndarray:
  """(n, n) positions in ``[0, v, -v]``: 1 + k above the diagonal, 1 + K + k below, 0 on it."""
  rows, cols = np.triu_indices(n, k=1)
  table = np.zeros((n, n), np.int32)
  table[rows, cols] = 1 + np.arange(rows.size)
  table[cols, rows] = 1 + rows.size + np.arange(rows.size)
  return table


def skew_to_vector(q: Array) -> Array:
  """Inverse of `skew_from_vector`: the strictly-upper entries of (..., n, n)."""
  n = q.shape[-1]
  rows, cols = jnp.triu_indices(n, k=1)
  return q[..., rows, cols]


def cayley(q: Array) -> Array:
  """Cayley transform ``R = (I + Q)(I - Q)^{-1}`` of skew-symmetric ``Q``.

  R is orthogonal with det(R) = 1 for every skew Q, and R = I at Q = 0.
  Batched over leading axes.
  """
  n = q.shape[-1]
  eye = jnp.eye(n, dtype=q.dtype)
  # (I - Q)^{-1} and (I + Q) commute, so solve(I - Q, I + Q) is the same matrix.
  return jnp.linalg.solve(eye - q, eye + q)


def cayley_neumann(q: Array, order: int) -> Array:
  """Cayley transform with the inverse replaced by a Neumann series.

  ``R ~= (I + Q)(I + Q + Q^2 + ... + Q^order)`` (Qiu et al., POET, 2025): no
  matrix inverse. Since ``(I - Q) S = I - Q^{k+1}`` for the series S, a skew Q
  gives ``R^T R = (I - (-Q)^{k+1})(I - Q^{k+1})``: the orthogonality error is
  about ``2 ||Q||^{k+1}`` for odd k and ``||Q||^{2k+2}`` for even k (||Q|| < 1).
  """
  if order < 1:
    raise ValueError(f"Neumann order k must be >= 1, got {order}.")
  n = q.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(n, dtype=q.dtype), q.shape)
  series, power = eye, eye
  for _ in range(order):
    power = power @ q
    series = series + power
  return (eye + q) @ series


def sym(x: Array) -> Array:
  """Symmetric part (X + X^T) / 2 of a square matrix (batched)."""
  return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def stiefel_project(x: Array, g: Array) -> Array:
  """Projection of ``g`` onto the tangent space of the Stiefel manifold at ``x``.

  For ``x`` with orthonormal columns (x^T x = I), the tangent space under the
  embedded metric is {xi : x^T xi + xi^T x = 0} and the projection is
  ``g - x sym(x^T g)`` (Absil, Mahony & Sepulchre, 2008, eq. 3.35).
  """
  return g - x @ sym(jnp.swapaxes(x, -1, -2) @ g)


def dct_matrix(n: int, dtype=jnp.float32) -> Array:
  """Orthonormal DCT-II matrix ``D`` (n, n) with ``D @ x`` the DCT of ``x``.

  ``D[k, j] = c_k cos(pi (2j + 1) k / (2n))`` with ``c_0 = sqrt(1/n)`` and
  ``c_k = sqrt(2/n)`` otherwise; ``D @ D.T = I``.
  """
  k = jnp.arange(n, dtype=jnp.float32)[:, None]
  j = jnp.arange(n, dtype=jnp.float32)[None, :]
  d = jnp.cos(math.pi * (2.0 * j + 1.0) * k / (2.0 * n)) * math.sqrt(2.0 / n)
  d = d.at[0].multiply(1.0 / math.sqrt(2.0))
  return d.astype(dtype)


def column_norms(w: Array) -> Array:
  """Euclidean norm of each column of (m, n) ``w``: shape (n,), in float32."""
  w = _as_float(w)
  return jnp.sqrt(jnp.sum(w * w, axis=0))


def inverse_permutation(perm: Array) -> Array:
  """``inv`` with ``inv[perm[i]] = i`` (integer arrays, batched over leading axes)."""
  return jnp.argsort(perm, axis=-1)


def permuted_block_diag(blocks: Array, perm: Array | None = None) -> Array:
  """The dense (n, n) matrix ``R = P^T diag(G_1, ..., G_k) P``.

  ``blocks`` is (k, b, b) with n = k b; ``P`` is the permutation matrix with
  ``P[i, perm[i]] = 1`` (so ``(P v)_i = v[perm[i]]``); ``perm=None`` is the
  identity. ``R`` is orthogonal when every block is. Reference for
  `block_diag_matmul`; it forms an n x n matrix, so use it only for checks.
  """
  k, b, _ = blocks.shape
  dense = jax.scipy.linalg.block_diag(*[blocks[i] for i in range(k)])
  if perm is None:
    return dense
  inv = inverse_permutation(perm)
  return dense[inv][:, inv]


def block_diag_matmul(x: Array, blocks: Array, perm: Array | None = None) -> Array:
  """``x @ P^T diag(G_1, ..., G_k) P`` along the last axis of ``x``, without forming it.

  The permuted block-diagonal orthogonal product of BOFT / POET-BS
  (Qiu et al., "Reparameterized LLM Training via Orthogonal Equivalence
  Transformation", 2025): gather the features by ``perm``, multiply each group
  of ``b`` consecutive features by its block, scatter back. Cost O(n b) per row
  instead of O(n^2).

  Args:
    x: (..., n) array.
    blocks: (k, b, b) with k b = n.
    perm: (n,) integer permutation, or None for the identity.
  """
  k, b, _ = blocks.shape
  n = x.shape[-1]
  if k * b != n:
    raise ValueError(f"blocks {blocks.shape} cover {k * b} features but x has {n}.")
  if perm is not None:
    x = jnp.take(x, perm, axis=-1)
  y = jnp.einsum("...kr,krc->...kc", x.reshape(x.shape[:-1] + (k, b)), blocks)
  y = y.reshape(x.shape)
  if perm is not None:
    y = jnp.take(y, inverse_permutation(perm), axis=-1)
  return y


def polar_retraction(x: Array, xi: Array) -> Array:
  """Polar retraction on the Stiefel manifold: ``polar(x + xi)``.

  Maps a tangent step ``xi`` at ``x`` (orthonormal columns) back onto the
  manifold: the closest matrix with orthonormal columns to ``x + xi``
  (Absil, Mahony & Sepulchre, 2008, Example 4.1.3).
  """
  return polar(jnp.asarray(x) + jnp.asarray(xi))


# -- Kronecker products -----------------------------------------------------------
def kron_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """Split ``dimension`` into ``(m, n)`` with ``m * n = dimension`` and ``m <= n``.

  The rule of LyCORIS / PEFT's LoKr (``peft.tuners.lokr.layer.factorization``):
  with ``factor > 0`` dividing ``dimension`` the result is ``(factor, dimension
  // factor)`` (not reordered); otherwise the pair of divisors closest to the
  square root whose smaller member does not exceed ``factor`` (any size for
  ``factor = -1``). ``kron_factorization(128) == (8, 16)``,
  ``kron_factorization(127) == (1, 127)``, ``kron_factorization(128, 4) == (4, 32)``.
  """
  if not isinstance(dimension, int) or dimension < 1:
    raise ValueError(f"dimension must be a positive integer, got {dimension!r}.")
  if factor == 0 or factor < -1:
    raise ValueError(f"factor must be -1 or a positive integer, got {factor!r}.")
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  limit = dimension if factor == -1 else factor
  m, n = 1, dimension
  while m < n:
    new_m = m + 1
    while dimension % new_m:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > m + n or new_m > limit:
      break
    m, n = new_m, new_n
  return (n, m) if m > n else (m, n)


def _check_kron_factors(a: Array, b: Array) -> None:
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
    raise ValueError(
        "Kronecker factors must be stacks (k, p, q) and (k, m, n) with the same k, got "
        f"shapes {a.shape} and {b.shape}.")


def kron_sum(a: Array, b: Array) -> Array:
  """``sum_i a_i ⊗ b_i`` for stacks ``a`` (k, p, q) and ``b`` (k, m, n): (p m, q n).

  Entry ``[i1 m + i2, j1 n + j2] = sum_i a_i[i1, j1] b_i[i2, j2]`` (``jnp.kron``'s order).
  """
  _check_kron_factors(a, b)
  _, p, q = a.shape
  _, m, n = b.shape
  return jnp.einsum("kac,kbd->abcd", _as_float(a), _as_float(b)).reshape(p * m, q * n)


def kron_sum_matmul(x: Array, a: Array, b: Array) -> Array:
  """``x @ kron_sum(a, b)`` without forming the (p m, q n) matrix.

  ``x`` (..., p m) is read as (..., p, m); the product is
  ``y[..., j1, j2] = sum_{i, i1, i2} x[..., i1, i2] a_i[i1, j1] b_i[i2, j2]``,
  O(k (p m q + q m n)) per row instead of O(p m q n) (Van Loan, "The ubiquitous
  Kronecker product", 2000: ``(A ⊗ B) vec(X) = vec(B X A^T)``).
  """
  _check_kron_factors(a, b)
  _, p, q = a.shape
  _, m, n = b.shape
  if x.shape[-1] != p * m:
    raise ValueError(f"x has {x.shape[-1]} features; the Kronecker factors need {p} * {m} = {p * m}.")
  x = x.reshape(x.shape[:-1] + (p, m))
  y = jnp.einsum("...ab,kac,kbd->...cd", x, a.astype(x.dtype), b.astype(x.dtype))
  return y.reshape(y.shape[:-2] + (q * n,))


def kron_rearrange(w: Array, a_shape: tuple[int, int]) -> Array:
  """Van Loan-Pitsianis rearrangement ``R(w)`` (p q, m n) of ``w`` (p m, q n).

  Row ``i1 q + j1`` of ``R(w)`` is the (i1, j1) block ``w[i1 m:(i1+1) m, j1 n:(j1+1) n]``
  flattened, so that ``R(a ⊗ b) = vec(a) vec(b)^T`` and
  ``||w - sum_i a_i ⊗ b_i||_F = ||R(w) - sum_i vec(a_i) vec(b_i)^T||_F``.
  """
  _check_matrix(w)
  p, q = a_shape
  rows, cols = w.shape
  if p < 1 or q < 1 or rows % p or cols % q:
    raise ValueError(
        f"Kronecker factor shape {tuple(a_shape)} does not divide the matrix shape {w.shape}: "
        "both dims of the first factor must divide the matrix's dims.")
  m, n = rows // p, cols // q
  return jnp.transpose(w.reshape(p, m, q, n), (0, 2, 1, 3)).reshape(p * q, m * n)


def kpsvd(w: Array, a_shape: tuple[int, int], k: int) -> tuple[Array, Array, Array]:
  """Kronecker-product SVD: the best ``sum_{i<k} a_i ⊗ b_i`` approximation of ``w``.

  Van Loan & Pitsianis, "Approximation with Kronecker Products" (1993): the SVD
  ``R(w) = sum_i s_i u_i v_i^T`` of the rearranged matrix (`kron_rearrange`)
  gives ``a_i = sqrt(s_i) reshape(u_i, a_shape)``, ``b_i = sqrt(s_i)
  reshape(v_i)``, optimal in Frobenius norm for every k.

  Returns:
    ``(a, b, s)``: stacks (k, p, q) and (k, m, n) and all the singular values of
    ``R(w)`` (descending), for choosing k by energy.
  """
  r = kron_rearrange(_as_float(w), a_shape)
  _check_rank(k, r.shape, "number of Kronecker terms k")
  u, s, vt = jnp.linalg.svd(r, full_matrices=False)
  root = jnp.sqrt(s[:k])
  p, q = a_shape
  m, n = w.shape[0] // p, w.shape[1] // q
  a = (u[:, :k] * root[None, :]).T.reshape(k, p, q)
  b = (root[:, None] * vt[:k]).reshape(k, m, n)
  return a, b, s


def block_diag(blocks: Array) -> Array:
  """Block-diagonal (n b, n b) matrix from a stack of blocks (n, b, b)."""
  n, b, _ = blocks.shape
  eye = jnp.eye(n, dtype=blocks.dtype)
  return jnp.einsum("ij,iab->iajb", eye, blocks).reshape(n * b, n * b)

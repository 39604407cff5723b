"""Initial values of the three-factor adapter ``dW = s * a @ core @ b``.

Pure functions of the base weight ``w0`` (fan_in, fan_out), a PRNG key and,
for gradient-based inits, the calibration gradient ``grad`` (same layout).
The outer factors are ``a`` (fan_in, k) and ``b`` (k, fan_out); the singular
values, when the init has them, come back separately so that the spec decides
where they go (into ``a``, into ``b``, or as the core).

Sources of the outer factors (``OUTER_INITS``):

* ``svd``, ``svd_bottom``: the top-k (bottom-k) singular triplets of ``w0``,
  ``a = U_k``, ``b = V_k^T``, ``sigma = S_k``.
* ``gradient_svd``: the top-k singular triplets of the approximate first
  full fine-tuning update ``-lr * sign(grad)`` (LoRA-SB).
* ``nystrom``: ``a = w0[:, :k]``, ``b = w0[:k, :]``, and the core candidate
  ``w0[:k, :k]`` (NLoRA's released code, transposed to our layout).
* ``skeleton``: the k columns and k rows of ``w0`` chosen by column-pivoted
  QR of ``w0`` and of ``w0^T`` (a CUR skeleton, PMSS).
* ``kaiming``: ``a`` kaiming-uniform (bound 1/sqrt(fan_in), PEFT's LoRA A),
  ``b = 0``.
* ``orthogonal``: ``a`` a random matrix with orthonormal columns, ``b = 0``.
* ``gaussian``: ``a ~ N(0, std^2)``, ``b ~ N(0, std^2)`` (AdaLoRA's P, Q); with
  ``std=None``, ``a ~ N(0, 1/fan_in)`` and ``b ~ N(0, 1/fan_out)`` (columns of
  ``a`` and rows of ``b`` of unit norm in expectation).
* ``random``: ``a ~ N(0, 1/fan_in)``, ``b ~ N(0, 1/k)``: frozen random
  projections (LoRA-Mini's auxiliary matrices).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from lowrank_jax import linalg

Array = jax.Array

OUTER_INITS = ("svd", "svd_bottom", "gradient_svd", "nystrom", "skeleton", "kaiming",
               "orthogonal", "gaussian", "random")
WEIGHT_AWARE = frozenset({"svd", "svd_bottom", "nystrom", "skeleton"})
WITH_SIGMA = frozenset({"svd", "svd_bottom", "gradient_svd"})


class OuterFactors(NamedTuple):
  """Outer factors of a three-factor init.

  Attributes:
    a: (fan_in, k).
    b: (k, fan_out).
    sigma: (k,) singular values for SVD inits, else None.
    core: (k, k) core candidate read from the weight (Nystrom), else None.
  """

  a: Array
  b: Array
  sigma: Array | None = None
  core: Array | None = None


def kaiming_uniform(key: Array, shape: tuple[int, int]) -> Array:
  """PEFT/torch ``kaiming_uniform_(a=sqrt(5))`` of a factor whose input dim is ``shape[0]``."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def random_orthonormal(key: Array, rows: int, cols: int) -> Array:
  """A (rows, cols) matrix with orthonormal columns (rows >= cols), Haar-distributed."""
  return linalg.orthonormalize(jax.random.normal(key, (rows, cols), jnp.float32))


def skeleton_indices(w: Array, k: int) -> Array:
  """The first k pivots of the column-pivoted QR of ``w``: k well-conditioned columns."""
  _, _, pivots = jax.scipy.linalg.qr(w, mode="economic", pivoting=True)
  return pivots[:k]


def outer_factors(init: str, key: Array, w0: Array, k: int, *, grad: Array | None = None,
                  update_lr: float = 1.0, std: float | None = 0.02) -> OuterFactors:
  """The outer factors named ``init`` (see the module docstring), float32."""
  w0 = w0.astype(jnp.float32)
  fan_in, fan_out = w0.shape
  if init in ("svd", "svd_bottom"):
    u, s, vt = linalg.svd_topk(w0, k, largest=init == "svd")
    return OuterFactors(u, vt, s)
  if init == "gradient_svd":
    update = -update_lr * jnp.sign(grad.astype(jnp.float32))
    u, s, vt = linalg.svd_topk(update, k)
    return OuterFactors(u, vt, s)
  if init == "nystrom":
    return OuterFactors(w0[:, :k], w0[:k, :], core=w0[:k, :k])
  if init == "skeleton":
    cols = skeleton_indices(w0, k)       # k output features
    rows = skeleton_indices(w0.T, k)     # k input features
    return OuterFactors(w0[:, cols], w0[rows, :], core=w0[rows][:, cols])
  key_a, key_b = jax.random.split(key)
  if init == "kaiming":
    return OuterFactors(kaiming_uniform(key_a, (fan_in, k)), jnp.zeros((k, fan_out), jnp.float32))
  if init == "orthogonal":
    return OuterFactors(random_orthonormal(key_a, fan_in, k), jnp.zeros((k, fan_out), jnp.float32))
  if init == "gaussian":
    std_a, std_b = (std, std) if std is not None else (1 / math.sqrt(fan_in), 1 / math.sqrt(fan_out))
    return OuterFactors(std_a * jax.random.normal(key_a, (fan_in, k), jnp.float32),
                        std_b * jax.random.normal(key_b, (k, fan_out), jnp.float32))
  if init == "random":
    return OuterFactors(jax.random.normal(key_a, (fan_in, k), jnp.float32) / math.sqrt(fan_in),
                        jax.random.normal(key_b, (k, fan_out), jnp.float32) / math.sqrt(k))
  raise ValueError(f"Unknown outer-factor init {init!r}; known: {list(OUTER_INITS)}.")


# -- sparse core patterns (SVFT) ------------------------------------------------
SPARSE_PATTERNS = ("diagonal", "banded", "random", "top_k")


def pattern_size(pattern: str, k: int, width: int) -> int:
  """Number of entries of a sparse k x k core pattern."""
  if pattern == "diagonal":
    return k
  if pattern == "banded":
    width = min(width, k - 1)
    return k + 2 * sum(k - d for d in range(1, width + 1))
  if pattern == "random":
    return pattern_size("banded", k, width)
  if pattern == "top_k":
    return width
  raise ValueError(f"Unknown sparse core pattern {pattern!r}; known: {list(SPARSE_PATTERNS)}.")


def sparse_pattern(pattern: str, key: Array, k: int, width: int, a: Array | None = None,
                   b: Array | None = None) -> tuple[Array, Array]:
  """(rows, cols) int32 indices of the trainable entries of a k x k core.

  * ``diagonal``: (i, i).
  * ``banded``: every (i, j) with |i - j| <= width.
  * ``random``: as many distinct uniformly random entries as the band of
    half-width ``width`` has (the reference code's count).
  * ``top_k``: the ``width`` pairs (i, j) with the largest alignment
    |a[:, i] . b[j, :]| between left and right singular vectors (needs
    fan_in == fan_out).
  """
  if pattern == "diagonal":
    idx = jnp.arange(k, dtype=jnp.int32)
    return idx, idx
  if pattern == "banded":
    i, j = jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij")
    keep = jnp.abs(i - j) <= width
    rows, cols = jnp.nonzero(keep, size=pattern_size("banded", k, width))
    return rows.astype(jnp.int32), cols.astype(jnp.int32)
  if pattern == "random":
    flat = jax.random.permutation(key, k * k)[:pattern_size("random", k, width)]
    return (flat // k).astype(jnp.int32), (flat % k).astype(jnp.int32)
  if pattern == "top_k":
    alignment = jnp.abs(a.astype(jnp.float32).T @ b.astype(jnp.float32).T)
    flat = jnp.argsort(-alignment.reshape(-1))[:width]
    return (flat // k).astype(jnp.int32), (flat % k).astype(jnp.int32)
  raise ValueError(f"Unknown sparse core pattern {pattern!r}; known: {list(SPARSE_PATTERNS)}.")

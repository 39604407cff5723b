"""Gradient-subspace projectors shared by every projected optimizer.

A projector maps the gradient ``G`` (m, n) of a matrix parameter to low-rank
coordinates and back:

* left side: ``P`` (m, r), ``S = P^T G`` (r, n), back-projection ``P S``;
* right side: ``P`` (n, r), ``S = G P`` (m, r), back-projection ``S P^T``.

``P`` is recomputed from the current gradient every ``refresh_every`` steps
(at steps 0, T, 2T, ...) by one of the strategies:

* ``svd``: top-r singular vectors of ``G`` (Zhao et al., "GaLore:
  Memory-Efficient LLM Training by Gradient Low-Rank Projection", 2024);
* ``randomized``: the same by randomized subspace iteration
  (`linalg.randomized_svd`; Liao et al., "GaLore+: Boosting Low-Rank
  Adaptation for LLMs with Cross-Head Projection", 2024);
* ``dct``: the r columns of the orthonormal DCT-II basis ``Q`` best aligned
  with ``G``, ``idx = top_r_j ||(Q^T G)_j||`` (row norms on the left side),
  ``P = Q[:, idx]``; only the int32 indices are stored and the r needed basis
  vectors are evaluated from their closed form when used (Modoranu et al.,
  "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
  Models", 2025);
* ``random``: a fresh random matrix, Gaussian with entries N(0, 1/r) so that
  ``E[P P^T] = I`` (Hao, Cao & Mou, "Flora: Low-Rank Adapters Are Secretly
  Gradient Compressors", 2024) or orthonormal (QR of a Gaussian);
* ``online_pca``: ``P`` starts from the top-r SVD of the first gradient and is
  then moved every step by one gradient step on the online-PCA loss
  ``||Ĝ - P P^T Ĝ||_F^2`` with ``Ĝ = G / ||G||_F`` (Liang et al., "Memory-
  Efficient LLM Training with Online Subspace Descent", 2024); the step size
  defaults to ``1 / refresh_every`` as in the reference code.

Which side: ``side='smaller'`` puts ``P`` on the smaller dimension as the
official GaLore code does (it projects ``G`` (m, n), m >= n, on the right, so
the moments are (m, r)); ``'larger'`` puts it on the larger dimension as
``optax.contrib.galore`` does (moments (r, min(m, n))); ``'left'``/``'right'``
force a side. Ties (m == n) go right for 'smaller' and left for 'larger',
matching the two references.

When ``P`` changes, the inner optimizer's moments (which live in the old
coordinates) follow a policy: ``keep`` (GaLore, optax), ``reset`` (zeros and
a fresh inner count, FRUGAL's default) or ``rotate``: ``S_new = R S_old``
(left) / ``S_old R^T`` (right) with ``R = P_new^T P_old`` (r, r), the map of
the old coordinates into the new subspace; leaves under a field named ``nu``
(optax's name for second moments) are mapped with ``R * R`` elementwise so
they stay non-negative (the map of the diagonal of a rotated covariance,
ignoring off-diagonal terms). ``rotate`` is Flora's momentum transfer.

Parameters: 2-D leaves are matrices; 0-D and 1-D leaves are not projected
(the caller gives them the inner optimizer at full size, as optax does);
leaves with more than 2 dims need ``row_axes`` (how many leading axes form
the rows of the matrix view) or must be excluded by a rank rule of ``None``
or by ``optax.masked``. ``rank`` is an int for every matrix or a sequence of
``(regex, rank or None)`` rules matched with ``re.fullmatch`` against the
'/'-joined parameter path, first match wins; matrices no rule matches are not
projected.

Everything runs under ``jit``: the per-leaf plan is static (shapes and paths),
the refresh is a ``lax.cond`` on the step count.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lowrank_jax import linalg
from lowrank_jax.optim import labels

STRATEGIES = ("svd", "randomized", "dct", "random", "online_pca")
POLICIES = ("keep", "reset", "rotate")
SIDES = ("smaller", "larger", "left", "right")
DISTRIBUTIONS = ("gaussian", "orthogonal")

RankRules = int | Sequence[tuple[str, "int | None"]]
RowAxesRules = int | Sequence[tuple[str, int]] | None


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one parameter leaf is projected (static, computed from its shape).

  Attributes:
    path: '/'-joined parameter path.
    shape: the leaf's shape.
    rows, cols: the (rows, cols) matrix view of the leaf.
    rank: projection rank, or None if the leaf is not projected.
    side: 'left' (P acts on rows) or 'right' (P acts on cols).
  """

  path: str
  shape: tuple[int, ...]
  rows: int
  cols: int
  rank: int | None
  side: str

  @property
  def projected(self) -> bool:
    return self.rank is not None

  @property
  def dim(self) -> int:
    """Size of the dimension that P acts on."""
    return self.rows if self.side == "left" else self.cols

  @property
  def low_rank_shape(self) -> tuple[int, int]:
    """Shape of the low-rank coordinates S."""
    return (self.rank, self.cols) if self.side == "left" else (self.rows, self.rank)


def _match_rules(rules, path: str, what: str):
  for pattern, value in rules:
    if re.fullmatch(pattern, path):
      return True, value
  return False, None


def _check_rules_used(rules, paths: list[str], what: str) -> None:
  for pattern, _ in rules:
    if not any(re.fullmatch(pattern, p) for p in paths):
      raise ValueError(f"{what} rule {pattern!r} matches no parameter; parameter paths: {paths}.")


@dataclasses.dataclass(frozen=True)
class Projector:
  """A projection strategy with its hyperparameters (see the module docstring).

  Attributes:
    rank: int for every matrix leaf, or ``(regex, rank or None)`` rules.
    strategy: one of `STRATEGIES`.
    refresh_every: T >= 1, steps between refreshes of P.
    side: one of `SIDES`.
    row_axes: for leaves with ndim > 2, the number of leading axes forming the
      rows of the matrix view: an int or ``(regex, int)`` rules.
    share_heads: leaves with ndim > 2 put P on their single model axis (the
      rows if ``row_axes == 1``, the columns if ``row_axes == ndim - 1``), so
      one projector of the model dimension serves every attention head
      (GaLore+'s cross-head projection); overrides ``side`` for those leaves.
    distribution: for ``random``: 'gaussian' (N(0, 1/r), Flora) or 'orthogonal'.
    niter, oversample: for ``randomized`` (see `linalg.randomized_svd`).
    online_lr: for ``online_pca``: step size of the P update (default 1/T).
    seed: seed of the random strategies; the key of each refresh is derived
      from (seed, leaf index, step), so no key is kept in the state.
  """

  rank: Any = 128
  strategy: str = "svd"
  refresh_every: int = 200
  side: str = "smaller"
  row_axes: Any = None
  share_heads: bool = False
  distribution: str = "gaussian"
  niter: int = 2
  oversample: int = 8
  online_lr: float | None = None
  seed: int = 0

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"Unknown projection strategy {self.strategy!r}; known: {list(STRATEGIES)}.")
    if self.side not in SIDES:
      raise ValueError(f"Unknown projection side {self.side!r}; known: {list(SIDES)}.")
    if self.distribution not in DISTRIBUTIONS:
      raise ValueError(f"Unknown random distribution {self.distribution!r}; known: {list(DISTRIBUTIONS)}.")
    if not isinstance(self.refresh_every, int) or isinstance(self.refresh_every, bool) or self.refresh_every < 1:
      raise ValueError(f"refresh_every must be an integer >= 1, got {self.refresh_every!r}.")
    if isinstance(self.rank, bool) or not (isinstance(self.rank, int) or _is_rules(self.rank)):
      raise ValueError(f"rank must be a positive int or a sequence of (regex, int or None) rules, "
                       f"got {self.rank!r}.")
    if isinstance(self.rank, int) and self.rank < 1:
      raise ValueError(f"rank must be >= 1, got {self.rank}.")
    if self.niter < 0 or self.oversample < 0:
      raise ValueError(f"niter and oversample must be >= 0, got {self.niter}, {self.oversample}.")
    if self.online_lr is not None and not self.online_lr > 0:
      raise ValueError(f"online_lr must be > 0, got {self.online_lr}.")

  # --- the static plan -------------------------------------------------------

  def plan(self, params) -> Any:
    """A tree of `LeafPlan` matching ``params`` (arrays or shape structs).

    Raises:
      ValueError: a rank above the leaf's matrix dims, a leaf of ndim > 2
        without ``row_axes``, or a rule that matches no parameter; each names
        the parameter path.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [labels.path_str(p) for p, _ in paths_leaves]
    if _is_rules(self.rank):
      _check_rules_used(self.rank, paths, "rank")
    if _is_rules(self.row_axes):
      _check_rules_used(self.row_axes, paths, "row_axes")
    plans = [self._leaf_plan(path, tuple(leaf.shape)) for path, (_, leaf) in zip(paths, paths_leaves)]
    return jax.tree_util.tree_unflatten(treedef, plans)

  def _leaf_plan(self, path: str, shape: tuple[int, ...]) -> LeafPlan:
    not_projected = LeafPlan(path, shape, 0, 0, None, "left")
    if _is_rules(self.rank):
      matched, rank = _match_rules(self.rank, path, "rank")
      if not matched or rank is None:
        return not_projected
    else:
      rank = self.rank
    if len(shape) < 2:
      return not_projected
    if len(shape) == 2:
      row_axes = 1
    else:
      row_axes = self.row_axes
      if _is_rules(row_axes):
        _, row_axes = _match_rules(row_axes, path, "row_axes")
      if row_axes is None:
        raise ValueError(
            f"Parameter {path!r} has shape {shape} (ndim {len(shape)}); projected optimizers need a "
            f"matrix: give row_axes (leading axes forming the rows), a rank rule of None for it, or "
            f"exclude it with optax.masked (e.g. lrj.optim.labels.mask_by_ndim).")
      if not isinstance(row_axes, int) or not 1 <= row_axes < len(shape):
        raise ValueError(f"row_axes for {path!r} (shape {shape}) must be an int in [1, {len(shape) - 1}], "
                         f"got {row_axes!r}.")
    rows, cols = math.prod(shape[:row_axes]), math.prod(shape[row_axes:])
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(rows, cols):
      raise ValueError(f"rank for parameter {path!r} (shape {shape}, matrix {rows}x{cols}) must be an int "
                       f"in [1, {min(rows, cols)}], got {rank!r}.")
    side = self._side(path, shape, row_axes, rows, cols)
    return LeafPlan(path, shape, rows, cols, rank, side)

  def _side(self, path, shape, row_axes, rows, cols) -> str:
    if self.share_heads and len(shape) > 2:
      if row_axes == 1:
        return "left"
      if row_axes == len(shape) - 1:
        return "right"
      raise ValueError(f"share_heads needs one model axis for {path!r} (shape {shape}): row_axes must be "
                       f"1 or {len(shape) - 1}, got {row_axes}.")
    if self.side == "smaller":
      return "left" if rows < cols else "right"
    if self.side == "larger":
      return "left" if rows >= cols else "right"
    return self.side

  # --- per-leaf state and maps ----------------------------------------------

  def init_leaf(self, plan: LeafPlan, dtype) -> jax.Array:
    """Zero projector state: int32 indices (r,) for dct, else P (dim, r) in ``dtype``."""
    if self.strategy == "dct":
      return jnp.zeros((plan.rank,), jnp.int32)
    return jnp.zeros((plan.dim, plan.rank), dtype)

  def state_bytes_leaf(self, plan: LeafPlan, itemsize: int) -> int:
    """Bytes of `init_leaf`'s array (the formula checked by the contract tests)."""
    if self.strategy == "dct":
      return 4 * plan.rank
    return plan.dim * plan.rank * itemsize

  def basis(self, plan: LeafPlan, state: jax.Array) -> jax.Array:
    """P (dim, r) in float32 (evaluated from the indices for dct)."""
    if self.strategy == "dct":
      return dct_columns(state, plan.dim)
    return state.astype(jnp.float32)

  def project(self, plan: LeafPlan, state: jax.Array, g: jax.Array) -> jax.Array:
    """Low-rank coordinates S of the (rows, cols) matrix ``g``, in float32."""
    p = self.basis(plan, state)
    g = g.astype(jnp.float32)
    return p.T @ g if plan.side == "left" else g @ p

  def back(self, plan: LeafPlan, state: jax.Array, s: jax.Array) -> jax.Array:
    """The (rows, cols) matrix P S (left) or S P^T (right), in float32."""
    p = self.basis(plan, state)
    s = s.astype(jnp.float32)
    return p @ s if plan.side == "left" else s @ p.T

  def overlap(self, plan: LeafPlan, new: jax.Array, old: jax.Array) -> jax.Array:
    """R = P_new^T P_old (r, r): old coordinates mapped into the new subspace."""
    if self.strategy == "dct":
      return (new[:, None] == old[None, :]).astype(jnp.float32)
    return self.basis(plan, new).T @ self.basis(plan, old)

  def refresh(self, plan: LeafPlan, state: jax.Array, g: jax.Array, count: jax.Array,
              leaf_index: int) -> jax.Array:
    """The projector state for step ``count`` given the (rows, cols) gradient ``g``.

    Computes a new P at steps 0, T, 2T, ... (every step for online_pca) and
    returns ``state`` unchanged otherwise.
    """
    g = g.astype(jnp.float32)
    gt = g if plan.side == "left" else g.T  # (dim, other): P spans its columns
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), leaf_index), count)

    def fresh():
      if self.strategy in ("svd", "online_pca"):
        # The SVD of g itself (not of its transpose), so that the signs are those of
        # optax.contrib.galore and the official GaLore code on both sides.
        u, _, vt = linalg.svd_topk(g, plan.rank)
        new = u if plan.side == "left" else vt.T
      elif self.strategy == "randomized":
        new, _, _ = linalg.randomized_svd(gt, plan.rank, key=key, niter=self.niter,
                                          oversample=self.oversample)
      elif self.strategy == "dct":
        scores = jnp.sum(jnp.square(dct_matrix(plan.dim) @ gt), axis=1)
        _, idx = jax.lax.top_k(scores, plan.rank)
        return idx.astype(jnp.int32)
      else:  # random
        new = jax.random.normal(key, (plan.dim, plan.rank), jnp.float32)
        new = new / math.sqrt(plan.rank) if self.distribution == "gaussian" else linalg.orthonormalize(new)
      return new.astype(state.dtype)

    if self.strategy == "online_pca":
      step_size = self.online_lr if self.online_lr is not None else 1.0 / self.refresh_every
      online = lambda: online_pca_step(state.astype(jnp.float32), gt, step_size).astype(state.dtype)
      return jax.lax.cond(count == 0, fresh, online)
    return jax.lax.cond(self.is_refresh_step(count), fresh, lambda: state)

  def is_refresh_step(self, count: jax.Array) -> jax.Array:
    """Whether P changes at step ``count`` (every step for online_pca)."""
    if self.strategy == "online_pca":
      return jnp.ones((), bool)
    return count % self.refresh_every == 0

  def to_matrix(self, plan: LeafPlan, x: jax.Array) -> jax.Array:
    return x.reshape(plan.rows, plan.cols)

  def from_matrix(self, plan: LeafPlan, x: jax.Array) -> jax.Array:
    return x.reshape(plan.shape)


def _is_rules(value) -> bool:
  return isinstance(value, (list, tuple)) and all(
      isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in value)


def dct_matrix(n: int) -> jax.Array:
  """The orthonormal DCT-II matrix D (n, n), float32; its rows are the basis vectors."""
  return linalg.dct_matrix(n, jnp.float32)


def dct_columns(indices: jax.Array, n: int) -> jax.Array:
  """Columns ``Q[:, indices]`` of the DCT basis ``Q = D^T`` (n, r), from the closed form.

  ``Q[j, k] = c_k cos(pi (2j + 1) k / (2n))``; equals ``linalg.dct_matrix(n).T[:, indices]``
  without forming the n x n matrix.
  """
  k = indices.astype(jnp.float32)[None, :]
  j = jnp.arange(n, dtype=jnp.float32)[:, None]
  scale = jnp.where(indices == 0, math.sqrt(1.0 / n), math.sqrt(2.0 / n))[None, :]
  return scale * jnp.cos(math.pi * (2.0 * j + 1.0) * k / (2.0 * n))


def online_pca_step(p: jax.Array, gt: jax.Array, step_size: float) -> jax.Array:
  """One gradient step on ``||Ĝ - P P^T Ĝ||_F^2``, ``Ĝ = gt / ||gt||_F`` (Online Subspace Descent)."""
  g_hat = gt / (jnp.linalg.norm(gt) + 1e-30)

  def loss(p):
    return jnp.sum(jnp.square(g_hat - p @ (p.T @ g_hat)))

  return p - step_size * jax.grad(loss)(p)

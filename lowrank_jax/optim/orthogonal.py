"""Orthogonalized optimizers: Muon, Dion, AuON and MARS-M as optax transforms.

Each method updates a matrix parameter along an (approximately) orthogonalized
direction built from a momentum buffer. Parameters are (fan_in, fan_out)
matrices in the layout of ``nnx.Linear.kernel`` (``y = x W``).

* `scale_by_muon` / `muon`: momentum, then a polar factor (Newton-Schulz with a
  choice of coefficient sets, exact SVD, or randomized low-rank), then a
  shape-based scale. Jordan et al., "Muon: An optimizer for hidden layers in
  neural networks" (2024); the Nesterov / inexact-polar analysis and the
  randomized low-rank polar of "Muon with Nesterov Momentum: Heavy-Tailed
  Noise and (Randomized) Inexact Polar Decomposition" (2025).
* `scale_by_dion` / `dion`: one warm-started power iteration with error
  feedback. Ahn, Xu, Abreu & Langford, "Dion: Distributed Orthonormalized
  Updates" (2025).
* `scale_by_auon` / `auon`: momentum divided by a cosh-based RMS, linear time,
  no orthogonalization. "AuON: A Linear-time Alternative to Semi-Orthogonal
  Momentum Updates" (2025).
* `scale_by_mars_m` / `mars_m`: MARS variance reduction in front of Muon. Liu
  et al., "MARS-M: When Variance Reduction Meets Matrices" (2025).

Every ``x(learning_rate, ...)`` chains ``scale_by_x`` with weight decay and the
learning rate, and sends every parameter outside ``mask`` (by default: the
ones that are not 2-D) to AdamW, as ``optax.contrib.muon`` does. A parameter
of another ndim reaching a ``scale_by_x`` raises, naming its path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import linalg
from lowrank_jax.optim import registry

Array = jax.Array

# Newton-Schulz coefficient sets: one (a, b, c) triple used at every step, or
# one triple per step (the set fixes the number of steps).
NEWTON_SCHULZ_COEFFS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # Jordan et al. (2024): the quintic maximizing the slope at 0; maps singular
    # values into roughly [0.7, 1.2] in 5 steps (optax preset 'standard').
    "muon": ((3.4445, -4.7750, 2.0315),),
    # The classical cubic iteration X <- 1.5 X - 0.5 X X^T X; converges to the
    # polar factor for full-rank inputs (slowly from small singular values).
    "cubic": ((1.5, -0.5, 0.0),),
    # Five per-step triples used by Dion's Muon (optax preset 'dion').
    "dion": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
             (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
             (2.8366, -3.0525, 1.2012)),
}
POLAR_METHODS = ("newton_schulz", "svd", "randomized")
SCALINGS = ("max_ratio", "ratio", "rms", "none")


# -- shared pieces --------------------------------------------------------------
def path_name(key_path) -> str:
  """A readable parameter path ('layer/kernel') from a jax key path."""
  parts = []
  for key in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def check_matrices(tree: Any, method: str) -> None:
  """Raise, naming the path, for a leaf of ``tree`` that is not a 2-D matrix."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, optax.MaskedNode):
      continue
    if jnp.ndim(leaf) != 2:
      raise ValueError(
          f"{method}: parameter '{path_name(key_path)}' has shape {jnp.shape(leaf)}; {method} "
          "orthogonalizes 2-D (fan_in, fan_out) matrices only. Select the matrices with "
          f"`mask=` in {method}(...) (the rest get AdamW), or wrap it in optax.masked / "
          "optax.partition.")


def _coefficient_set(coeffs: str | tuple) -> tuple[tuple[float, float, float], ...]:
  if isinstance(coeffs, str):
    if coeffs not in NEWTON_SCHULZ_COEFFS:
      raise ValueError(
          f"Unknown ns_coeffs {coeffs!r}; known coefficient sets: {sorted(NEWTON_SCHULZ_COEFFS)}, "
          "or pass one (a, b, c) triple or a tuple of per-step triples.")
    return NEWTON_SCHULZ_COEFFS[coeffs]
  triples = (tuple(coeffs),) if not isinstance(coeffs[0], (tuple, list)) else tuple(map(tuple, coeffs))
  if any(len(t) != 3 for t in triples):
    raise ValueError(f"ns_coeffs must be (a, b, c) triples, got {coeffs!r}.")
  return triples


def static_number(value, name: str, kind=int):
  """A structural hyperparameter (a shape or a loop length) as a Python number.

  ``optax.inject_hyperparams`` turns numeric arguments into arrays; these ones
  cannot be traced, so they default to None and must be listed in its
  ``static_args`` when given.
  """
  if value is None:
    return None
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} fixes a shape or a loop length and cannot be a traced hyperparameter; use "
        f"optax.inject_hyperparams(..., static_args=({name!r},)).")
  return kind(value) if isinstance(value, (jax.Array, np.ndarray)) else value


def newton_schulz_steps(coeffs: str | tuple, ns_steps: int) -> tuple[tuple[float, float, float], ...]:
  """The per-step coefficient list of a coefficient set run for ``ns_steps`` steps."""
  triples = _coefficient_set(coeffs)
  ns_steps = static_number(ns_steps, "ns_steps")
  if ns_steps is None:
    ns_steps = 5 if len(triples) == 1 else len(triples)
  if len(triples) == 1:
    if not isinstance(ns_steps, int) or ns_steps < 1:
      raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}.")
    return triples * ns_steps
  if ns_steps != len(triples):
    raise ValueError(
        f"The coefficient set {coeffs!r} has {len(triples)} per-step triples; ns_steps must be "
        f"{len(triples)}, got {ns_steps!r}.")
  return triples


def orthogonalize(x: Array, *, polar: str = "newton_schulz", ns_coeffs=(), eps: float = 1e-8,
                  rank: int | None = None, key: Array | None = None) -> Array:
  """An (approximate) orthogonal polar factor of the matrix ``x``, in float32.

  * 'newton_schulz': ``linalg.newton_schulz`` with the per-step ``ns_coeffs``
    (from `newton_schulz_steps`), after ``x / (||x||_F + eps)``.
  * 'svd': the exact polar factor ``U V^T`` (``linalg.polar``).
  * 'randomized': ``U_k V_k^T`` from a rank-``rank`` randomized SVD
    (``linalg.randomized_svd`` with ``key``): the randomized low-rank polar.
  """
  if polar == "newton_schulz":
    return linalg.newton_schulz(x, steps=len(ns_coeffs), coeffs=ns_coeffs, eps=eps)
  if polar == "svd":
    return linalg.polar(x)
  if polar == "randomized":
    u, _, vt = linalg.randomized_svd(x, rank, key=key)
    return u @ vt
  raise ValueError(f"Unknown polar {polar!r}; known: {POLAR_METHODS}.")


def shape_scale(shape: tuple[int, int], scaling: str, rms: float = 0.2) -> float:
  """The shape factor applied to an orthogonalized (fan_in, fan_out) update.

  * 'max_ratio': ``sqrt(max(1, fan_out / fan_in))`` (Jordan's Muon; optax default).
  * 'ratio': ``sqrt(fan_out / fan_in)`` (Dion's reference code).
  * 'rms': ``rms * sqrt(max(fan_in, fan_out))`` (Liu et al., "Muon is Scalable
    for LLM Training", 2025: matches AdamW's update RMS at rms = 0.2; MARS-M).
  * 'none': 1.
  """
  fan_in, fan_out = shape
  if scaling == "max_ratio":
    return math.sqrt(max(1.0, fan_out / fan_in))
  if scaling == "ratio":
    return math.sqrt(fan_out / fan_in)
  if scaling == "rms":
    return rms * math.sqrt(max(fan_in, fan_out))
  if scaling == "none":
    return 1.0
  raise ValueError(f"Unknown scaling {scaling!r}; known: {SCALINGS}.")


def _check_choice(value, allowed, what):
  if value not in allowed:
    raise ValueError(f"Unknown {what} {value!r}; known: {tuple(allowed)}.")


def _check_unit_interval(value, what):
  """A momentum in [0, 1) (arrays from inject_hyperparams are not checked)."""
  if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
    raise ValueError(f"{what} must be in [0, 1), got {value!r}.")


def map_leaves(fn: Callable[..., tuple], tree: Any, *rest: Any) -> tuple[Any, ...]:
  """``fn`` on matching leaves of trees shaped like ``tree``; one tree per output.

  Masked leaves (``optax.MaskedNode``, no array leaves) are kept as they are.
  """
  leaves, treedef = jax.tree.flatten(tree)
  others = [treedef.flatten_up_to(t) for t in rest]
  outputs = [fn(*args) for args in zip(leaves, *others)]
  return tuple(treedef.unflatten(list(column)) for column in zip(*outputs)) if outputs else (
      (tree,) * (1 + len(rest)))


def _leaf_keys(seed: int, count: Array, n: int) -> list[Array]:
  """One PRNG key per leaf and step: fold_in(fold_in(key(seed), step), leaf)."""
  step_key = jax.random.fold_in(jax.random.key(seed), count)
  return [jax.random.fold_in(step_key, i) for i in range(n)]


def with_matrix_partition(name: str, matrix_tx: optax.GradientTransformation,
                          fallback: optax.GradientTransformation,
                          mask: Any | Callable[[Any], Any] | None) -> optax.GradientTransformation:
  """``matrix_tx`` on the leaves selected by ``mask``, ``fallback`` elsewhere.

  ``mask`` is a tree of bools like the params, or a callable returning one;
  None selects the 2-D leaves and raises (naming the path) for a leaf of ndim
  > 2, whose matrix reading (conv window, heads) the caller must choose.
  """

  def labels(params):
    if mask is None:
      def label(key_path, leaf):
        if jnp.ndim(leaf) > 2:
          raise ValueError(
              f"{name}: parameter '{path_name(key_path)}' has shape {jnp.shape(leaf)} (ndim > 2); "
              f"pass mask= to {name}(...) to choose which leaves are orthogonalized (reshape "
              "them to matrices first), the others get AdamW.")
        return "matrix" if jnp.ndim(leaf) == 2 else "fallback"
      return jax.tree_util.tree_map_with_path(label, params)
    chosen = mask(params) if callable(mask) else mask
    return jax.tree_util.tree_map(lambda m: "matrix" if m else "fallback", chosen)

  return optax.partition({"matrix": matrix_tx, "fallback": fallback}, labels)


def _finish(name, direction, learning_rate, weight_decay, mask, adam_learning_rate, adam_b1,
            adam_b2, adam_eps, adam_weight_decay, adam_nesterov):
  """direction -> + weight_decay * x -> * -lr on matrices; AdamW on the rest."""
  matrix_tx = optax.chain(direction, optax.add_decayed_weights(weight_decay),
                          optax.scale_by_learning_rate(learning_rate))
  fallback = optax.adamw(learning_rate if adam_learning_rate is None else adam_learning_rate,
                         b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=adam_weight_decay,
                         nesterov=adam_nesterov)
  return with_matrix_partition(name, matrix_tx, fallback, mask)


# -- closed-form state sizes (default mask: the 2-D leaves; AdamW on the rest) ----------
def _nbytes(x, dtype=None) -> int:
  return math.prod(x.shape) * jnp.dtype(dtype or x.dtype).itemsize


def _matrices(params) -> list:
  return [x for x in jax.tree.leaves(params) if len(x.shape) == 2]


def _adamw_fallback_bytes(params) -> int:
  """The AdamW group: its int32 count, then mu and nu of every non-matrix leaf."""
  return 4 + 2 * sum(_nbytes(x) for x in jax.tree.leaves(params) if len(x.shape) != 2)


def muon_state_bytes(params, mu_dtype=None, **unused) -> int:
  """count + one momentum per matrix + the AdamW group."""
  del unused
  return 4 + sum(_nbytes(x, mu_dtype) for x in _matrices(params)) + _adamw_fallback_bytes(params)


def dion_state_bytes(params, rank=None, mu_dtype=None, **unused) -> int:
  """M (m x n) and Q (fan_in x r) per matrix + the AdamW group."""
  del unused
  rank = 0.25 if rank is None else rank
  total = 0
  for x in _matrices(params):
    r = dion_rank(x.shape, rank)
    total += _nbytes(x, mu_dtype) + x.shape[0] * r * jnp.dtype(mu_dtype or x.dtype).itemsize
  return total + _adamw_fallback_bytes(params)


def auon_state_bytes(params, **unused) -> int:
  """One momentum per matrix + the AdamW group."""
  del unused
  return sum(_nbytes(x) for x in _matrices(params)) + _adamw_fallback_bytes(params)


def mars_m_state_bytes(params, **unused) -> int:
  """Momentum and previous gradient per matrix + the AdamW group."""
  del unused
  return 2 * sum(_nbytes(x) for x in _matrices(params)) + _adamw_fallback_bytes(params)


# -- Muon -----------------------------------------------------------------------
class ScaleByMuonState(NamedTuple):
  count: Array
  mu: Any


def scale_by_muon(beta: float = 0.95, *, nesterov: bool = True, bias_correction: bool = True,
                  polar: str = "newton_schulz", ns_coeffs: str | tuple = "muon",
                  ns_steps: int | None = None, polar_rank: int | None = None, eps: float = 1e-8,
                  scaling: str = "max_ratio", rms: float = 0.2, seed: int | None = None,
                  mu_dtype: Any = None) -> optax.GradientTransformation:
  """Muon's direction: ``scale * polar(momentum)`` for 2-D parameters.

  ``m_t = beta m_{t-1} + (1 - beta) g_t``; the orthogonalized matrix is
  ``N_t = beta m_t + (1 - beta) g_t`` (Nesterov) or ``m_t``. With
  ``bias_correction`` (optax's convention) the Nesterov mix is
  ``beta m_t / (1 - beta^{t+1}) + (1 - beta) g_t / (1 - beta^t)`` and the plain
  momentum ``m_t / (1 - beta^t)``. The paper's sum form ``M_t = beta M_{t-1} +
  g_t``, ``N_t = g_t + beta M_t`` is ``(1 - beta)`` times ours without bias
  correction, the same direction once normalized. The update is
  ``shape_scale * orthogonalize(N_t)`` (see `orthogonalize`, `shape_scale`).

  Equal to ``optax.contrib.scale_by_muon`` followed by ``scale_by_shape`` with
  the defaults (polar='newton_schulz', ns_coeffs='muon' or 'dion',
  scaling='max_ratio' or 'rms'); added here: the exact and randomized polar
  factors, per-step coefficient sets by name, the 'ratio' and 'none' scalings,
  and errors that name the parameter path. The iteration runs in float32.

  Args:
    beta: momentum decay in [0, 1).
    nesterov: orthogonalize the Nesterov mix instead of the momentum.
    bias_correction: optax's bias correction of the momentum.
    polar: 'newton_schulz', 'svd' (exact) or 'randomized' (low-rank).
    ns_coeffs: a name in `NEWTON_SCHULZ_COEFFS`, one (a, b, c) triple, or a
      tuple of per-step triples.
    ns_steps: Newton-Schulz steps; None is 5, or the length of a per-step set
      (which it must equal when given).
    polar_rank: rank k of the randomized polar (required for 'randomized').
    eps: added to the Frobenius norm before Newton-Schulz.
    scaling: 'max_ratio', 'ratio', 'rms' or 'none' (`shape_scale`).
    rms: the target RMS of scaling='rms'.
    seed: PRNG seed of the randomized polar's test matrices (None is 0).
    mu_dtype: dtype of the momentum; None keeps the parameter dtype.
  """
  _check_unit_interval(beta, "beta")
  _check_choice(polar, POLAR_METHODS, "polar")
  polar_rank = static_number(polar_rank, "polar_rank")
  seed = static_number(seed, "seed") or 0
  _check_choice(scaling, SCALINGS, "scaling")
  coeffs = newton_schulz_steps(ns_coeffs, ns_steps) if polar == "newton_schulz" else ()
  if polar == "randomized" and (not isinstance(polar_rank, int) or polar_rank < 1):
    raise ValueError(f"polar='randomized' needs polar_rank, an integer >= 1; got {polar_rank!r}.")

  def init_fn(params):
    check_matrices(params, "muon")
    if polar == "randomized":
      for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if polar_rank > min(leaf.shape):
          raise ValueError(
              f"muon: polar_rank={polar_rank} exceeds min{tuple(leaf.shape)} = {min(leaf.shape)} "
              f"for parameter '{path_name(key_path)}'.")
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    return ScaleByMuonState(count=jnp.zeros([], jnp.int32), mu=mu)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    if nesterov and bias_correction:
      mixed = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                           optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                           optax.tree.bias_correction(updates, beta, count))
    elif nesterov:
      mixed = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates)
    else:
      mixed = optax.tree.bias_correction(mu, beta, count) if bias_correction else mu
    leaves, treedef = jax.tree.flatten(mixed)
    keys = _leaf_keys(seed, count, len(leaves)) if polar == "randomized" else [None] * len(leaves)
    directions = [
        (shape_scale(x.shape, scaling, rms)
         * orthogonalize(x, polar=polar, ns_coeffs=coeffs, eps=eps, rank=polar_rank, key=k)
         ).astype(g.dtype)
        for x, k, g in zip(leaves, keys, jax.tree.leaves(updates))]
    return (jax.tree.unflatten(treedef, directions),
            ScaleByMuonState(count=count, mu=optax.tree.cast(mu, mu_dtype)))

  return optax.GradientTransformation(init_fn, update_fn)


@registry.register("muon", example={},
                   state_bytes=muon_state_bytes)
def muon(learning_rate: optax.ScalarOrSchedule, beta: float = 0.95, *, nesterov: bool = True,
         bias_correction: bool = True, polar: str = "newton_schulz",
         ns_coeffs: str | tuple = "muon", ns_steps: int | None = None, polar_rank: int | None = None,
         eps: float = 1e-8, scaling: str = "max_ratio", rms: float = 0.2, seed: int | None = None,
         mu_dtype: Any = None, weight_decay: float = 0.0, mask: Any = None,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.9,
         adam_b2: float = 0.999, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
         adam_nesterov: bool = True) -> optax.GradientTransformation:
  """Muon: `scale_by_muon`, ``+ weight_decay * x``, ``* -learning_rate`` on matrices.

  Leaves outside ``mask`` (default: those of ndim < 2; ndim > 2 raises) get
  ``optax.adamw(adam_learning_rate or learning_rate, adam_b1, adam_b2,
  adam_eps, adam_weight_decay, nesterov=adam_nesterov)``. With the defaults it
  equals ``optax.contrib.muon(learning_rate, beta=beta, eps=eps,
  weight_decay=weight_decay)``; ``scaling='rms'`` matches its
  ``consistent_rms=rms``.
  """
  direction = scale_by_muon(beta, nesterov=nesterov, bias_correction=bias_correction, polar=polar,
                            ns_coeffs=ns_coeffs, ns_steps=ns_steps, polar_rank=polar_rank, eps=eps,
                            scaling=scaling, rms=rms, seed=seed, mu_dtype=mu_dtype)
  return _finish("muon", direction, learning_rate, weight_decay, mask, adam_learning_rate, adam_b1,
                 adam_b2, adam_eps, adam_weight_decay, adam_nesterov)


# -- Dion -----------------------------------------------------------------------
class ScaleByDionState(NamedTuple):
  momentum: Any   # M, like the parameter
  right: Any      # Q, (fan_in, r) per matrix


def dion_rank(shape: tuple[int, int], rank: int | float, path: str = "") -> int:
  """The power-iteration rank r: an integer, or a fraction of min(shape) (ceil)."""
  limit = min(shape)
  where = f" for parameter '{path}' of shape {tuple(shape)}" if path else ""
  if isinstance(rank, float):
    if not 0.0 < rank <= 1.0:
      raise ValueError(f"dion: a fractional rank must be in (0, 1], got {rank!r}{where}.")
    return max(1, math.ceil(rank * limit))
  if not isinstance(rank, int) or rank < 1 or rank > limit:
    raise ValueError(f"dion: rank must be an integer in [1, min(fan_in, fan_out) = {limit}] or a "
                     f"fraction in (0, 1], got {rank!r}{where}.")
  return rank


def dion_step(b: Array, q: Array, mu: float, eps: float = 1e-8) -> tuple[Array, Array, Array]:
  """One Dion step on ``B = M + G`` in the (m, n) = (fan_out, fan_in) reading.

  ``P = orth(B Q)``, ``R = B^T P``, ``M' = B - (1 - mu) P R^T``,
  ``Q' = colnorm(R)``; returns ``(P Q'^T, M', Q')`` (float32).
  """
  b = b.astype(jnp.float32)
  p = linalg.orthonormalize(b @ q.astype(jnp.float32))
  r = b.T @ p
  new_momentum = b - (1.0 - mu) * (p @ r.T)
  new_q = r / (linalg.column_norms(r)[None, :] + eps)
  return p @ new_q.T, new_momentum, new_q


def scale_by_dion(rank: int | float | None = None, mu: float = 0.95, *, eps: float = 1e-8,
                  scaling: str = "ratio", rms: float = 0.2, seed: int | None = None,
                  mu_dtype: Any = None) -> optax.GradientTransformation:
  """Dion's direction for 2-D parameters (Ahn et al., 2025, Algorithm 1).

  With the parameter read as ``X`` (m, n) = (fan_out, fan_in) as in the
  reference code's ``torch.nn.Linear`` weights, momentum ``M`` (m, n) and the
  warm-started right factor ``Q`` (n, r), each step is

      B = M + G;  P = orth(B Q);  R = B^T P;  M <- B - (1 - mu) P R^T;
      Q <- colnorm(R);  update = sqrt(m / n) P Q^T

  (`dion_step`). The error feedback keeps in ``M`` what the rank-r update did
  not apply. At full rank ``P R^T = B``, so ``M <- mu B``, and when ``Q`` holds
  the right singular vectors of ``B`` (the fixed point of the warm-started
  power iteration) the update is exactly ``sqrt(m/n) polar(B)``. Column
  normalization is not the polar factor of ``R`` in general (Orth-Dion, 2026),
  so before the iteration settles the update is only near-orthogonal.

  Differences from the reference code (microsoft/dion ``dion_simple.py``): a
  rank above min(m, n) raises instead of being clipped; ``rank`` may be a
  fraction of min(m, n); QR signs are fixed (the update does not depend on
  them); ``Q`` starts from a seeded Gaussian; computed in float32.

  Args:
    rank: r, an integer or a fraction of min(fan_in, fan_out) in (0, 1];
      None is 0.25.
    mu: momentum decay in [0, 1).
    eps: added to the column norms of R.
    scaling: shape factor (`shape_scale`); 'ratio' is the paper's sqrt(m/n).
    rms: target RMS of scaling='rms'.
    seed: PRNG seed of the initial Q (None is 0).
    mu_dtype: dtype of M and Q; None keeps the parameter dtype.
  """
  _check_unit_interval(mu, "mu")
  _check_choice(scaling, SCALINGS, "scaling")
  rank = static_number(rank, "rank", kind=lambda v: v.item())
  rank = 0.25 if rank is None else rank
  seed = static_number(seed, "seed") or 0

  def init_fn(params):
    check_matrices(params, "dion")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = _leaf_keys(seed, jnp.zeros([], jnp.int32), len(flat))
    rights = []
    for (key_path, x), key in zip(flat, keys):
      r = dion_rank(x.shape, rank, path_name(key_path))
      rights.append(jax.random.normal(key, (x.shape[0], r), mu_dtype or x.dtype))
    momentum = optax.tree.zeros_like(params, dtype=mu_dtype)
    return ScaleByDionState(momentum=momentum, right=jax.tree.unflatten(treedef, rights))

  def update_fn(updates, state, params=None):
    del params

    def one(g, m, q):
      b = m.astype(jnp.float32) + g.astype(jnp.float32)
      # Transposes map the (fan_in, fan_out) layout onto the paper's (m, n).
      direction, new_m, new_q = dion_step(b.T, q, mu, eps)
      scale = shape_scale(g.shape, scaling, rms)
      return (scale * direction.T).astype(g.dtype), new_m.T.astype(m.dtype), new_q.astype(q.dtype)

    directions, momentum, right = map_leaves(one, updates, state.momentum, state.right)
    return directions, ScaleByDionState(momentum=momentum, right=right)

  return optax.GradientTransformation(init_fn, update_fn)


@registry.register("dion", example={"learning_rate": 0.1},
                   state_bytes=dion_state_bytes)
def dion(learning_rate: optax.ScalarOrSchedule, rank: int | float | None = None, mu: float = 0.95, *,
         eps: float = 1e-8, scaling: str = "ratio", rms: float = 0.2, seed: int | None = None,
         mu_dtype: Any = None, weight_decay: float = 0.0, mask: Any = None,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
         adam_nesterov: bool = False) -> optax.GradientTransformation:
  """Dion: `scale_by_dion`, ``+ weight_decay * x``, ``* -learning_rate`` on matrices.

  ``x <- x - lr (sqrt(m/n) P Q^T + weight_decay x)`` as the reference code's
  ``X.mul_(1 - wd lr); X.addmm_(P, Q^T, alpha=-lr sqrt(m/n))``; leaves
  outside ``mask`` (default: ndim < 2) get AdamW with the reference's betas.
  """
  direction = scale_by_dion(rank, mu, eps=eps, scaling=scaling, rms=rms, seed=seed,
                            mu_dtype=mu_dtype)
  return _finish("dion", direction, learning_rate, weight_decay, mask, adam_learning_rate, adam_b1,
                 adam_b2, adam_eps, adam_weight_decay, adam_nesterov)


# -- AuON -----------------------------------------------------------------------
class ScaleByAuonState(NamedTuple):
  momentum: Any


def auon_direction(g: Array, gamma: float, eps: float = 1e-7) -> Array:
  """``G / rho`` with ``rho = sqrt(mean(cosh(gamma G / ||G||_F)^2))`` (float32)."""
  g = g.astype(jnp.float32)
  rho = jnp.sqrt(jnp.mean(jnp.cosh(gamma * g / (jnp.linalg.norm(g) + eps)) ** 2))
  return g / (rho + 1e-8)


def scale_by_auon(beta: float = 0.95, gamma: float = 1.5) -> optax.GradientTransformation:
  """AuON's direction: Nesterov-style momentum divided by a cosh RMS.

  ``m <- beta m + (1 - beta) g``, ``G = g + beta (m - g)`` (``lerp(g, m,
  beta)``), update ``G / sqrt(mean(cosh(gamma G / ||G||_F)^2))``: linear time,
  no orthogonalization. This follows the public reference code (ryyzn9/AuON
  ``AuON.step``), which may differ from the paper; the Hybrid-AuON variant
  (one extra Newton-Schulz step) is not implemented. Unlike the reference, a
  zero gradient gives a zero update instead of skipping the parameter.
  """
  _check_unit_interval(beta, "beta")

  def init_fn(params):
    check_matrices(params, "auon")
    return ScaleByAuonState(momentum=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    momentum = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, updates)
    directions = jax.tree.map(
        lambda g, m: auon_direction(g + beta * (m - g), gamma).astype(g.dtype), updates, momentum)
    return directions, ScaleByAuonState(momentum=momentum)

  return optax.GradientTransformation(init_fn, update_fn)


@registry.register("auon", example={},
                   state_bytes=auon_state_bytes)
def auon(learning_rate: optax.ScalarOrSchedule, beta: float = 0.95, gamma: float = 1.5, *,
         weight_decay: float = 0.0, mask: Any = None,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.8,
         adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
         adam_nesterov: bool = False) -> optax.GradientTransformation:
  """AuON: `scale_by_auon`, ``+ weight_decay * x``, ``* -learning_rate`` on matrices.

  The reference decays before the step (``p *= 1 - lr wd``), the same update.
  Leaves outside ``mask`` (default: ndim < 2) get AdamW.
  """
  return _finish("auon", scale_by_auon(beta, gamma), learning_rate, weight_decay, mask,
                 adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay, adam_nesterov)


# -- MARS-M ---------------------------------------------------------------------
class ScaleByMarsMState(NamedTuple):
  momentum: Any
  previous_grad: Any


def scale_by_mars_m(beta: float = 0.95, gamma: float = 0.025, *, ns_coeffs: str | tuple = "muon",
                    ns_steps: int | None = None, eps: float = 1e-7, scaling: str = "rms",
                    rms: float = 0.2) -> optax.GradientTransformation:
  """MARS-M's direction (approximate version) for 2-D parameters.

      c_t = g_t + gamma beta / (1 - beta) (g_t - g_{t-1});  c_t <- c_t / max(1, ||c_t||_F)
      m_t = beta m_{t-1} + (1 - beta) c_t;  update = 0.2 sqrt(max(fan_in, fan_out)) NS(m_t)

  with ``g_0 = 0``. As the official code (AGI-Arena/MARS ``MARS_M/optimizers/
  mars_m.py``, ``is_approx=True``): the previous step's gradient stands in for
  a second gradient at the previous point on the same batch, the clip is
  always applied, the momentum is not Nesterov. Newton-Schulz runs in float32
  (the reference casts to bfloat16).
  """
  _check_unit_interval(beta, "beta")
  _check_choice(scaling, SCALINGS, "scaling")
  coeffs = newton_schulz_steps(ns_coeffs, ns_steps)
  factor = gamma * beta / (1.0 - beta)

  def init_fn(params):
    check_matrices(params, "mars_m")
    zeros = optax.tree.zeros_like(params)
    return ScaleByMarsMState(momentum=zeros, previous_grad=zeros)

  def update_fn(updates, state, params=None):
    del params

    def one(g, m, g_prev):
      g32 = g.astype(jnp.float32)
      c = g32 + factor * (g32 - g_prev.astype(jnp.float32))
      c = c / jnp.maximum(1.0, jnp.linalg.norm(c))
      m = beta * m.astype(jnp.float32) + (1 - beta) * c
      o = orthogonalize(m, polar="newton_schulz", ns_coeffs=coeffs, eps=eps)
      return (shape_scale(g.shape, scaling, rms) * o).astype(g.dtype), m.astype(g.dtype), g

    directions, momentum, previous = map_leaves(one, updates, state.momentum, state.previous_grad)
    return directions, ScaleByMarsMState(momentum=momentum, previous_grad=previous)

  return optax.GradientTransformation(init_fn, update_fn)


@registry.register("mars_m", example={},
                   state_bytes=mars_m_state_bytes)
def mars_m(learning_rate: optax.ScalarOrSchedule, beta: float = 0.95, gamma: float = 0.025, *,
           ns_coeffs: str | tuple = "muon", ns_steps: int | None = None, eps: float = 1e-7,
           scaling: str = "rms", rms: float = 0.2, weight_decay: float = 0.0, mask: Any = None,
           adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.9,
           adam_b2: float = 0.95, adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
           adam_nesterov: bool = False) -> optax.GradientTransformation:
  """MARS-M: `scale_by_mars_m`, ``+ weight_decay * x``, ``* -learning_rate`` on matrices.

  ``x <- x - lr (0.2 sqrt(max(A, B)) NS(m_t) + weight_decay x)`` as the
  official code; leaves outside ``mask`` (default: ndim < 2) get AdamW.
  """
  direction = scale_by_mars_m(beta, gamma, ns_coeffs=ns_coeffs, ns_steps=ns_steps, eps=eps,
                              scaling=scaling, rms=rms)
  return _finish("mars_m", direction, learning_rate, weight_decay, mask, adam_learning_rate,
                 adam_b1, adam_b2, adam_eps, adam_weight_decay, adam_nesterov)

"""GaLore and the projected optimizers built on it: GaLore+, Flora, Online Subspace Descent.

Every matrix parameter's gradient ``G`` is projected to low-rank coordinates
``S = P^T G`` (or ``G P``) by a `projection.Projector`; any optax
transform (the *inner* optimizer, Adam by default) runs on ``S``; its output
is projected back and scaled:

    u = scale * P inner(P^T G)          (left side; right: inner(G P) P^T)

optionally plus a state-free step on the residual ``G - P P^T G``:

    u += residual_scale * rule(G - P P^T G),  rule in {sign, sgd, topk}

(FRUGAL uses sign/sgd, see `frugal.py`; GaLore+'s sparse residual is topk).
Leaves that are not projected (vectors, scalars, matrices no rank rule
matches) get the inner optimizer at full size, as in ``optax.contrib.galore``.

References:
  Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
  Projection" (2024). Liao et al., "GaLore+: Boosting Low-Rank Adaptation for
  LLMs with Cross-Head Projection" (2024). Hao, Cao & Mou, "Flora: Low-Rank
  Adapters Are Secretly Gradient Compressors" (2024). Liang et al.,
  "Memory-Efficient LLM Training with Online Subspace Descent" (2024).

Added over ``optax.contrib.galore``: the projection strategies, the side
rule, per-parameter ranks by path, the moment policies on refresh, the
residual step, errors instead of silently clipping the rank. With
``strategy='svd', policy='keep', side='larger'`` and Adam it computes what
``optax.contrib.galore`` computes (tested); ``side='smaller'`` (the default)
is the official GaLore code's choice. Differences from the papers are noted
in each factory's docstring and in docs/optimizers.md.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import projection
from lowrank_jax.optim import registry

RESIDUALS = ("sign", "sgd", "topk")


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Attributes:
    count: steps taken (int32).
    projector: per leaf, the projector state (P, or int32 indices for dct);
      None for leaves that are not projected.
    inner_state: the inner optimizer's state on the low-rank coordinates.
    full_state: the inner optimizer's state on the leaves not projected.
  """

  count: jax.Array
  projector: Any
  inner_state: optax.OptState
  full_state: optax.OptState


def scale_by_galore(
    rank: Any = 128,
    refresh_every: int = 200,
    *,
    strategy: str = "svd",
    policy: str = "keep",
    inner: optax.GradientTransformation | None = None,
    scale: float = 1.0,
    side: str = "smaller",
    row_axes: Any = None,
    share_heads: bool = False,
    distribution: str = "gaussian",
    niter: int = 2,
    oversample: int = 8,
    online_lr: float | None = None,
    seed: int = 0,
    residual: str | None = None,
    residual_scale: float = 1.0,
    residual_density: float = 0.01,
) -> optax.GradientTransformation:
  """Projected-gradient scaling: ``scale * P inner(P^T G)`` (+ optional residual step).

  Args:
    rank: int, or ``(regex, rank or None)`` rules over parameter paths.
    refresh_every: steps T between projector refreshes (>= 1).
    strategy: 'svd', 'randomized', 'dct', 'random' or 'online_pca'.
    policy: what the inner moments do when P changes: 'keep', 'reset', 'rotate'.
    inner: optax transform run on the low-rank coordinates (and at full size
      on the leaves not projected); default ``optax.scale_by_adam()``. It must
      not need ``params`` (e.g. no ``adamw``; use ``weight_decay`` of `galore`).
    scale: the factor alpha on the back-projected update (GaLore's scale).
    side, row_axes, share_heads, distribution, niter, oversample, online_lr,
      seed: see `projection.Projector`.
    residual: None, or the rule for the residual ``G - P P^T G``: 'sign'
      (signSGD), 'sgd', or 'topk' (its ``residual_density`` fraction of
      largest-magnitude entries, zero elsewhere).
    residual_scale: the factor on the residual step.
    residual_density: fraction of entries kept by 'topk', in (0, 1].

  Returns:
    An ``optax.GradientTransformation`` with `GaLoreState`.

  Raises:
    ValueError: unknown strategy, side, policy or residual rule, a refresh
      period below 1, 'reset' with online_pca (P changes every step), and,
      when the transform meets its parameters, a rank above a parameter's
      dims or a parameter of ndim > 2 without ``row_axes`` (naming the path).
  """
  projector = projection.Projector(
      rank=rank, strategy=strategy, refresh_every=refresh_every, side=side, row_axes=row_axes,
      share_heads=share_heads, distribution=distribution, niter=niter, oversample=oversample,
      online_lr=online_lr, seed=seed)
  if policy not in projection.POLICIES:
    raise ValueError(f"Unknown refresh policy {policy!r}; known: {list(projection.POLICIES)}.")
  if policy == "reset" and strategy == "online_pca":
    raise ValueError("policy='reset' with strategy='online_pca' would zero the moments every step "
                     "(P moves every step); use 'keep' or 'rotate'.")
  if residual is not None and residual not in RESIDUALS:
    raise ValueError(f"Unknown residual rule {residual!r}; known: {list(RESIDUALS)} or None.")
  if not 0.0 < residual_density <= 1.0:
    raise ValueError(f"residual_density must be in (0, 1], got {residual_density}.")
  inner = optax.scale_by_adam() if inner is None else inner

  def split(tree, plans):
    """Flat leaves, flat plans, and the treedef of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef.flatten_up_to(plans), treedef

  def low_rank_zeros(plans, leaves, treedef):
    return treedef.unflatten([
        jnp.zeros(pl.low_rank_shape, x.dtype) if pl.projected else None
        for pl, x in zip(plans, leaves)])

  def full_only(plans, leaves, treedef):
    return treedef.unflatten([None if pl.projected else x for pl, x in zip(plans, leaves)])

  def init_fn(params):
    plans_tree = projector.plan(params)
    leaves, plans, treedef = split(params, plans_tree)
    proj = treedef.unflatten([
        projector.init_leaf(pl, x.dtype) if pl.projected else None for pl, x in zip(plans, leaves)])
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projector=proj,
        inner_state=inner.init(low_rank_zeros(plans, leaves, treedef)),
        full_state=inner.init(full_only(plans, leaves, treedef)))

  def update_fn(updates, state, params=None):
    del params
    plans_tree = projector.plan(updates)
    leaves, plans, treedef = split(updates, plans_tree)
    old = treedef.flatten_up_to(state.projector)
    count = state.count
    mats = [projector.to_matrix(pl, g) if pl.projected else None for pl, g in zip(plans, leaves)]
    new = [projector.refresh(pl, p, m, count, i) if pl.projected else None
           for i, (pl, p, m) in enumerate(zip(plans, old, mats))]
    low = treedef.unflatten([
        projector.project(pl, p, m).astype(g.dtype) if pl.projected else None
        for pl, p, m, g in zip(plans, new, mats, leaves)])

    inner_state = _apply_policy(policy, inner, projector, state.inner_state, plans, old, new,
                                treedef, low, projector.is_refresh_step(count))
    low_updates, inner_state = inner.update(low, inner_state, None)
    full_updates, full_state = inner.update(full_only(plans, leaves, treedef), state.full_state, None)
    low_updates = treedef.flatten_up_to(low_updates)
    full_updates = treedef.flatten_up_to(full_updates)

    out = []
    for pl, p, m, g, lu, fu in zip(plans, new, mats, leaves, low_updates, full_updates):
      if not pl.projected:
        out.append(fu)
        continue
      u = scale * projector.back(pl, p, lu)
      if residual is not None:
        rest = m.astype(jnp.float32) - projector.back(pl, p, projector.project(pl, p, m))
        u = u + residual_scale * _residual_step(residual, rest, residual_density)
      out.append(projector.from_matrix(pl, u).astype(g.dtype))
    new_state = GaLoreState(
        count=optax.safe_int32_increment(count),
        projector=treedef.unflatten(new),
        inner_state=inner_state,
        full_state=full_state)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _residual_step(rule: str, rest: jax.Array, density: float) -> jax.Array:
  if rule == "sign":
    return jnp.sign(rest)
  if rule == "sgd":
    return rest
  k = max(1, math.ceil(density * rest.size))
  threshold = jax.lax.top_k(jnp.abs(rest).reshape(-1), k)[0][-1]
  return jnp.where(jnp.abs(rest) >= threshold, rest, 0.0)


def _apply_policy(policy, inner, projector, inner_state, plans, old, new, treedef, low, refresh):
  """The inner state after P changed from ``old`` to ``new`` (only where ``refresh``)."""
  if policy == "keep":
    return inner_state
  if policy == "reset":
    fresh = inner.init(jax.tree.map(jnp.zeros_like, low))
    return jax.tree.map(lambda f, s: jnp.where(refresh, f, s), fresh, inner_state)
  # rotate: S <- R S (left) / S R^T (right), R = P_new^T P_old; R * R for second moments ('nu').
  overlaps = treedef.unflatten([
      projector.overlap(pl, n, o) if pl.projected else None for pl, n, o in zip(plans, new, old)])
  sides = treedef.unflatten([pl.side if pl.projected else None for pl in plans])
  marks = optax.tree_utils.tree_map_params(
      inner, lambda _, r, side: (r, side), inner_state, overlaps, sides,
      transform_non_params=lambda v: jax.tree.map(lambda _: None, v),
  )
  mark_leaves = jax.tree.structure(inner_state).flatten_up_to(marks)
  path_leaves, state_def = jax.tree_util.tree_flatten_with_path(inner_state)
  rotated = []
  for (path, leaf), mark in zip(path_leaves, mark_leaves):
    if mark is None:
      rotated.append(leaf)
      continue
    r, side = mark
    if any(getattr(key, "name", None) == "nu" for key in path):
      r = r * r
    m = leaf.astype(jnp.float32)
    moved = r @ m if side == "left" else m @ r.T
    rotated.append(jnp.where(refresh, moved.astype(leaf.dtype), leaf))
  return jax.tree_util.tree_unflatten(state_def, rotated)


def _with_lr(transform, learning_rate, weight_decay=0.0, mask=None):
  return optax.chain(transform, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


# --- state-bytes formula (checked against the real state by the contract tests) ---

def state_bytes(params, *, moments: int = 2, inner_counts: int = 2, rank=128, strategy="svd",
                side="smaller", row_axes=None, share_heads=False, **unused) -> int:
  """Bytes of a `scale_by_galore` state for ``params`` with an inner optimizer of
  ``moments`` param-shaped moment trees and one int32 count per instance:

      4 (count) + sum_projected [P: dim r itemsize | dct: 4 r]
        + inner_counts * 4 + moments * itemsize * (sum_projected r * other + sum_rest size)
  """
  del unused
  projector = projection.Projector(rank=rank, strategy=strategy, side=side, row_axes=row_axes,
                                   share_heads=share_heads)
  leaves, treedef = jax.tree.flatten(params)
  plans = treedef.flatten_up_to(projector.plan(params))
  total = 4 + 4 * inner_counts
  for pl, x in zip(plans, leaves):
    itemsize = jnp.dtype(x.dtype).itemsize
    if pl.projected:
      total += projector.state_bytes_leaf(pl, itemsize) + moments * itemsize * math.prod(pl.low_rank_shape)
    else:
      total += moments * itemsize * math.prod(x.shape)
  return total


def adam_state_bytes(params, **hp):
  if hp.get("inner") is not None:
    raise ValueError("The state-bytes formula covers the default inner optimizer (Adam) only.")
  return state_bytes(params, moments=2, **hp)


# --- factories ---------------------------------------------------------------
# Every factory lists its hyperparameters explicitly (no **kwargs), so that
# optax.inject_hyperparams sees them; integer structural arguments (rank,
# refresh_every) must then be named in its ``static_args``.

@registry.register("galore", example={"rank": 4, "refresh_every": 2}, state_bytes=adam_state_bytes)
def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    refresh_every: int = 200,
    strategy: str = "svd",
    policy: str = "keep",
    scale: float = 1.0,
    inner: optax.GradientTransformation | None = None,
    side: str = "smaller",
    row_axes: Any = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """GaLore: ``W <- W - lr (scale * P Adam(P^T G) + weight_decay * W)``.

  The paper's pretraining setting is ``scale=0.25``, ``refresh_every=200``;
  the defaults here are optax's (scale 1). Decoupled weight decay is applied
  in the full space, as in optax.contrib.galore. `scale_by_galore` has the
  remaining options (residual step, randomized-SVD and random settings).
  """
  return _with_lr(scale_by_galore(rank, refresh_every, strategy=strategy, policy=policy, inner=inner,
                                  scale=scale, side=side, row_axes=row_axes, seed=seed),
                  learning_rate, weight_decay, mask)


@registry.register("galore_dct", example={"rank": 4, "refresh_every": 2},
                   state_bytes=lambda params, **hp: adam_state_bytes(params, strategy="dct", **hp))
def galore_dct(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    refresh_every: int = 200,
    policy: str = "keep",
    scale: float = 1.0,
    inner: optax.GradientTransformation | None = None,
    side: str = "smaller",
    row_axes: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """SVD-free GaLore: `galore` with the DCT projector (Modoranu et al., 2025).

  ``P = Q[:, idx]``, ``idx = top_r ||(Q^T G)_j||`` over the DCT-II basis Q;
  the state holds r int32 indices per matrix instead of P.
  """
  return galore(learning_rate, rank, refresh_every, strategy="dct", policy=policy, scale=scale,
                inner=inner, side=side, row_axes=row_axes, weight_decay=weight_decay, mask=mask)


@registry.register("galore_plus",
                   example={"rank": 4, "refresh_every": 2, "residual_density": 0.1, "niter": 1,
                            "policy": "rotate"},
                   state_bytes=lambda params, **hp: adam_state_bytes(
                       params, strategy="randomized", share_heads=True, **{"row_axes": 1, **hp}))
def galore_plus(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    refresh_every: int = 200,
    policy: str = "keep",
    scale: float = 1.0,
    inner: optax.GradientTransformation | None = None,
    row_axes: Any = 1,
    niter: int = 2,
    oversample: int = 8,
    residual_density: float | None = None,
    residual_scale: float = 1.0,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """GaLore+: randomized-SVD projector shared across heads, optional sparse residual.

  * ``P`` from `linalg.randomized_svd` (``niter`` power iterations,
    ``oversample`` extra columns).
  * Cross-head projection: a kernel stored with heads as axes, e.g.
    (d, heads, head_dim) with ``row_axes=1`` or (heads, head_dim, d) with
    ``row_axes=2``, gets one P on its model axis d, computed from all heads'
    gradients together and used for every head.
  * ``residual_density``: if given, the top ``residual_density`` fraction of
    the residual ``G - P P^T G`` by magnitude is added to the update, times
    ``residual_scale`` (a state-free sparse SGD step).

  A randomized SVD returns basis vectors of arbitrary sign at each refresh,
  so with ``policy='keep'`` the kept moments can point the wrong way after a
  refresh; ``policy='rotate'`` maps them (see docs/optimizers.md).

  Differs from the paper: the paper approximates the cross-head SVD from a
  few heads and keeps moment estimates for its sparse residual (inferred from
  its description); here P comes from all heads at once and the residual step
  is state-free.
  """
  residual = None if residual_density is None else "topk"
  return _with_lr(
      scale_by_galore(rank, refresh_every, strategy="randomized", policy=policy, inner=inner,
                      scale=scale, row_axes=row_axes, share_heads=True, niter=niter,
                      oversample=oversample, seed=seed, residual=residual,
                      residual_scale=residual_scale,
                      residual_density=1.0 if residual_density is None else residual_density),
      learning_rate, weight_decay, mask)


@registry.register("flora", example={"rank": 4, "refresh_every": 10},
                   state_bytes=lambda params, **hp: state_bytes(params, moments=1, strategy="random", **hp))
def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    refresh_every: int = 1000,
    b1: float = 0.9,
    distribution: str = "gaussian",
    inner: optax.GradientTransformation | None = None,
    side: str = "smaller",
    row_axes: Any = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """Flora: momentum kept in random low-rank coordinates, resampled every T (kappa) steps.

  ``P`` is Gaussian with entries N(0, 1/r), ``E[P P^T] = I``, resampled every
  ``refresh_every`` steps; the compressed momentum is carried over to the new
  projection by ``R = P_new^T P_old`` (the 'rotate' policy), and the update is
  ``P ema_b1(P^T G)``. Each transfer between independent Gaussian
  projections inflates the momentum's norm by about sqrt(dim / r), which the
  decay b1^T must outweigh: keep T large (the paper's kappa is 1000).

  Differs from the reference code: it regenerates P from a seed instead of
  storing it, and feeds the decompressed momentum to Adafactor; here P is
  stored and the inner optimizer is an EMA (pass ``inner``, or chain an optax
  preconditioner after this transform, for other variants).
  """
  inner = optax.ema(b1) if inner is None else inner
  return _with_lr(
      scale_by_galore(rank, refresh_every, strategy="random", policy="rotate", inner=inner,
                      distribution=distribution, side=side, row_axes=row_axes, seed=seed),
      learning_rate, weight_decay, mask)


@registry.register("online_subspace_descent", example={"rank": 4, "online_lr": 0.1},
                   state_bytes=lambda params, **hp: adam_state_bytes(params, strategy="online_pca", **hp))
def online_subspace_descent(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    refresh_every: int = 200,
    online_lr: float | None = None,
    policy: str = "keep",
    scale: float = 1.0,
    inner: optax.GradientTransformation | None = None,
    side: str = "smaller",
    row_axes: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """Online Subspace Descent: ``u = P_t Adam(P_t^T G_t)`` with P moved every step by online PCA.

  ``P_t = P_{t-1} - online_lr * grad_P ||Ĝ_t - P P^T Ĝ_t||_F^2`` with
  ``Ĝ = G / ||G||_F``, ``P_0`` from the SVD of the first gradient,
  ``online_lr`` defaulting to ``1 / refresh_every`` as in the reference code.

  Differs from the reference code: plain gradient descent on P (the reference
  defaults to AdamW on P, with SGD as an option), and the current gradient is
  projected with the updated P.
  """
  return _with_lr(
      scale_by_galore(rank, refresh_every, strategy="online_pca", policy=policy, inner=inner,
                      scale=scale, side=side, row_axes=row_axes, online_lr=online_lr),
      learning_rate, weight_decay, mask)

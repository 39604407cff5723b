"""Riemannian optimization on the Stiefel manifold around any optax optimizer.

The modular scheme of StelLA (Li et al., "StelLA: Subspace Learning in
Low-rank Adaptation using Stiefel Manifold", NeurIPS 2025; official code
SonyResearch/stella), for every masked leaf X (m, n), m >= n, X^T X = I:

1. Riemannian gradient (canonical metric): ``rgrad = G - X G^T X``;
2. the inner optimizer's update ``D`` from ``rgrad`` (any optax transform:
   its moments are kept in the Euclidean embedding, as in the official code);
3. optional scaling ``D / sqrt(m / c)`` (the official ``stella_grad_scaling``,
   c = the model's hidden size);
4. projection onto the tangent space at X: ``D <- D - X sym(X^T D)``;
5. retraction ``X_new = polar(X + D)`` (the official default) or
   ``qf(X + D)`` (QR with a positive diagonal of R); the emitted update is
   ``X_new - X``, so ``optax.apply_updates`` lands on the manifold.

Wide leaves (m < n, orthonormal rows) are handled transposed. Leaves outside
the mask get the inner optimizer's update unchanged. The official code also
excludes U and V from weight decay: pass the inner optimizer a weight-decay
mask such as ``lambda p: not_stiefel(p)`` (see `stiefel_mask`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import linalg
from lowrank_jax.optim import labels
from lowrank_jax.optim import registry
from lowrank_jax.optim import sites

PyTree = Any
STIEFEL_LEAVES = ("stella_u", "stella_v")
RETRACTIONS = ("polar", "qr")


def stiefel_mask(params: PyTree, names=STIEFEL_LEAVES) -> PyTree:
  """True for the leaves named ``stella_u`` / ``stella_v`` (or ``names``)."""
  return sites.leaf_mask(params, names)


def not_stiefel(params: PyTree, names=STIEFEL_LEAVES) -> PyTree:
  """The complement of `stiefel_mask` (e.g. as a weight-decay mask)."""
  return jax.tree_util.tree_map(lambda m: not m, stiefel_mask(params, names))


def riemannian_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """``G - X G^T X``: the Riemannian gradient on St(m, n) under the canonical metric."""
  return g - x @ (g.T @ x)


def qr_retraction(y: jax.Array) -> jax.Array:
  """The Q factor of ``y = QR`` with diag(R) > 0 (Absil et al., 2008, eq. 4.8)."""
  q, r = jnp.linalg.qr(y)
  signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
  return q * signs[None, :]


def _retract(name: str) -> Callable[[jax.Array], jax.Array]:
  return linalg.polar if name == "polar" else qr_retraction


class StiefelState(NamedTuple):
  inner: optax.OptState


def _tall(fn):
  """Apply a (x, d) -> array function to tall matrices, transposing wide ones."""
  def apply(x, *args):
    if x.shape[0] >= x.shape[1]:
      return fn(x, *args)
    return fn(x.T, *(a.T for a in args)).T
  return apply


def stiefel(inner: optax.GradientTransformation, *, mask: PyTree | Callable[[PyTree], PyTree] = stiefel_mask,
            retraction: str = "polar", hidden_size: float | None = None
            ) -> optax.GradientTransformationExtraArgs:
  """Turn ``inner`` into a Riemannian optimizer for the masked Stiefel leaves.

  Args:
    inner: any optax transform, producing updates (already negated and scaled
      by its learning rate, as optax.adam does).
    mask: a pytree of bools like the params, or a function of the params
      returning one; default: the leaves named ``stella_u`` / ``stella_v``.
    retraction: 'polar' (official default) or 'qr'.
    hidden_size: c of the official ``stella_grad_scaling``: the update of an
      (m, n) leaf (m >= n) is divided by ``sqrt(m / c)``; None: no scaling.

  Returns:
    A transform whose ``update`` needs ``params``.

  Raises:
    ValueError: unknown retraction, ``hidden_size <= 0``; at ``init``/``update``
      a masked leaf that is not a 2-D matrix (its path named), or ``params``
      missing at ``update``.
  """
  if retraction not in RETRACTIONS:
    raise ValueError(f"stiefel: retraction must be one of {list(RETRACTIONS)}, got {retraction!r}.")
  if hidden_size is not None and not hidden_size > 0:
    raise ValueError(f"stiefel: hidden_size must be > 0 or None, got {hidden_size!r}.")
  retract = _retract(retraction)

  def resolve_mask(params):
    m = mask(params) if callable(mask) else mask
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_mask = jax.tree_util.tree_leaves(m)
    if len(flat_mask) != len(flat):
      raise ValueError(f"stiefel: the mask has {len(flat_mask)} leaves, the params {len(flat)}.")
    for (path, leaf), selected in zip(flat, flat_mask):
      if selected and jnp.ndim(leaf) != 2:
        raise ValueError(
            f"stiefel: leaf '{labels.path_str(path)}' has shape {jnp.shape(leaf)}; the Stiefel "
            "manifold holds 2-D matrices with orthonormal columns (or rows). Exclude it from the mask.")
    return m

  def init_fn(params):
    resolve_mask(params)
    return StiefelState(inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("stiefel: update needs params (the current points on the manifold).")
    m = resolve_mask(params)

    def egrad_to_rgrad(selected, g, x):
      return _tall(riemannian_grad)(x.astype(jnp.float32), g.astype(jnp.float32)).astype(g.dtype) if selected else g

    rgrads = jax.tree_util.tree_map(egrad_to_rgrad, m, updates, params)
    steps, inner_state = inner.update(rgrads, state.inner, params, **extra_args)

    def to_manifold(selected, d, x):
      if not selected:
        return d
      def move(x, d):
        if hidden_size is not None:
          d = d / jnp.sqrt(x.shape[0] / hidden_size)
        d = linalg.stiefel_project(x, d)
        return retract(x + d) - x
      return _tall(move)(x.astype(jnp.float32), d.astype(jnp.float32)).astype(d.dtype)

    return jax.tree_util.tree_map(to_manifold, m, steps, params), StiefelState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stella_state_bytes(params, **unused) -> int:
  """The inner AdamW's int32 count, mu and nu (parameter dtype); the Stiefel wrapper keeps none."""
  del unused
  return 4 + 2 * registry.tree_bytes(params)


@registry.register("stella", example={}, params="lora", state_bytes=stella_state_bytes)
def stella(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, weight_decay: float = 0.0, retraction: str = "polar",
           hidden_size: float | None = None) -> optax.GradientTransformationExtraArgs:
  """StelLA's optimizer: `stiefel` around AdamW, with no weight decay on U and V.

  The leaves named ``stella_u`` / ``stella_v`` stay orthonormal; every other
  leaf (S, heads, other adapters) gets plain AdamW.
  """
  inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=not_stiefel)
  return stiefel(inner, retraction=retraction, hidden_size=hidden_size)

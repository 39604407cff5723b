"""AdaPreLoRA: the LoRA factor step closest, in the Adafactor metric, to Adafactor's step on W.

Liu, Bian & Cai, "AdaPreLoRA: Adafactor Preconditioned Low-Rank Adaptation",
2026 (arXiv 2605.08734). No official code is public.

Layout (as in `lowrank_jax.optim.lora`): at every adapter site ``lora_a`` a
(fan_in=n, r) and ``lora_b`` b (r, fan_out=m), ``W = W0 + s a b``. The
factor gradients are ``g_a = Ĝ b^T`` and ``g_b = a^T Ĝ`` with ``Ĝ = s dL/dW``.

1. Adafactor's factored second moment of the gradient (Shazeer & Stern,
   2018, as in ``optax.scale_by_factored_rms``): per site a row statistic
   ``v_row`` (n) and a column statistic ``v_col`` (m), ``v <- beta_t v + (1 -
   beta_t)(mean of squares + eps)`` with ``beta_t = 1 - t^-decay_rate``, and
   ``sqrt(V̂) = p q^T``, ``p = sqrt(v_row / mean(v_row))``, ``q = sqrt(v_col)``.
   The metric is ``H = diag(p) ⊗ diag(q)``: ``||X||_H^2 = sum_ij p_i q_j X_ij^2``;
   Adafactor's step on W is ``D = H^-1 Ĝ = Ĝ / (p q^T)``.
2. The factor step solves the paper's normal equations
   ``J^* H J (da, db) = J^* Ĝ`` with ``J(da, db) = da b + a db``: every solution
   induces the same ``dW``, the H-orthogonal projection of D onto the tangent
   space of rank-r matrices at ``a b`` (the closest LoRA update to D in the H
   norm). Among the solutions (``(da + a Y, db - Y b)`` for any r x r Y) the
   one with the smallest H-weighted imbalance ``||da b - a db||_H`` splits the
   shared part equally; with ``ã = diag(p)^½ a``, ``b̃ = b diag(q)^½`` and their
   projectors ``Π_ã``, ``Π_b̃``, the two contributions are
   ``da b = diag(p)^-½ (I - ½ Π_ã) D̃ Π_b̃ diag(q)^-½`` and
   ``a db = diag(p)^-½ Π_ã D̃ (I - ½ Π_b̃) diag(q)^-½`` (``D̃ = diag(p)^½ D diag(q)^½``).
   In closed form, from the factor gradients only, with
   ``K_a = a^T diag(p) a``, ``K_b = b diag(q) b^T``, ``C = a^T g_a``:

       da = [diag(p)^-1 g_a - ½ a K_a^-1 C] K_b^-1 / s
       db = K_a^-1 [g_b diag(q)^-1 - ½ C K_b^-1 b] / s

   (``/ s``: the step of ``s a b`` approximates D). Cost per site:
   O((m + n) r^2) time, O(m + n) state, no (n, m) matrix formed.

Inferred (the paper's full text was not available, only its abstract and
summaries; see docs/optimizers.md): the imbalance criterion (taken as the
H-norm of ``da b - a db``; the closed form halves the shared term, which
matches the one summary seen), and the source of the Adafactor statistics:
the full gradient's row and column sums of squares cannot be recovered from
``g_a``, ``g_b``, so ours are those of its tangent projection
``T = Π_a Ĝ + (I - Π_a) Ĝ Π_b`` (Frobenius projectors of a's columns and b's
rows), computed in O((m + n) r^2) from ``g_a``, ``g_b``. With those choices
the step is invariant under ``(a, b) -> (a N, N^-1 b)``: the statistics, the
induced ``dW`` and ``da b``, ``a db`` do not change and ``(da, db) -> (da N,
N^-1 db)``, so whole trajectories of ``a b`` are (up to the ridge ``delta``).
Adafactor's update clipping and relative step size are not applied.

Leaves that are not a ``lora_a``/``lora_b`` pair get their gradient unchanged
(then the optional momentum and the learning rate, as in ``scaled_gd``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import lora
from lowrank_jax.optim import registry
from lowrank_jax.optim import sites

PyTree = Any
PAIR = lora.PAIR


def tangent_moments(g_a: jax.Array, g_b: jax.Array, a: jax.Array, b: jax.Array, delta: float
                    ) -> tuple[jax.Array, jax.Array]:
  """Row (n) and column (m) mean squares of ``T = Π_a Ĝ + (I - Π_a) Ĝ Π_b``, from ``g_a``, ``g_b``.

  ``T = Π_a Ĝ (I - Π_b) + Ĝ Π_b`` (orthogonal in rows) ``= Π_a Ĝ + (I - Π_a) Ĝ Π_b``
  (orthogonal in columns), with ``Ĝ Π_b = g_a k_b b``, ``Π_a Ĝ = a k_a g_b``,
  ``k_a = (a^T a + dI)^-1``, ``k_b = (b b^T + dI)^-1``.
  """
  k_a = lora._ridge_inverse(a.T @ a, delta)
  k_b = lora._ridge_inverse(b @ b.T, delta)
  c = a.T @ g_a                                                  # = g_b b^T = a^T Ĝ b^T
  rest_b = k_a @ (g_b @ g_b.T - c @ k_b @ c.T) @ k_a             # rows of Π_a Ĝ (I - Π_b)
  rest_a = k_b @ (g_a.T @ g_a - c.T @ k_a @ c) @ k_b             # columns of (I - Π_a) Ĝ Π_b
  row_sq = jnp.sum((g_a @ k_b) * g_a, axis=1) + jnp.sum((a @ rest_b) * a, axis=1)
  col_sq = jnp.sum((k_a @ g_b) * g_b, axis=0) + jnp.sum(b * (rest_a @ b), axis=0)
  n, m = a.shape[0], b.shape[1]
  return row_sq / m, col_sq / n


def adafactor_factors(v_row: jax.Array, v_col: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(p, q)`` with ``sqrt(V̂) = p q^T``, ``V̂ = v_row v_col^T / mean(v_row)`` (Adafactor)."""
  return jnp.sqrt(v_row / jnp.mean(v_row)), jnp.sqrt(v_col)


def balanced_factor_step(g_a: jax.Array, g_b: jax.Array, a: jax.Array, b: jax.Array, p: jax.Array,
                         q: jax.Array, delta: float) -> tuple[jax.Array, jax.Array]:
  """``(da, db)``: the least-imbalance solution of ``min ||da b + a db - Ĝ/(p q^T)||_H``.

  ``H`` weights entry (i, j) by ``p_i q_j``; ``g_a = Ĝ b^T``, ``g_b = a^T Ĝ``.
  """
  inv_ka = lora._ridge_inverse(a.T @ (p[:, None] * a), delta)
  inv_kb = lora._ridge_inverse((b * q[None, :]) @ b.T, delta)
  c = a.T @ g_a
  da = (g_a / p[:, None] - 0.5 * a @ (inv_ka @ c)) @ inv_kb
  db = inv_ka @ (g_b / q[None, :] - 0.5 * (c @ inv_kb) @ b)
  return da, db


class ScaleByAdaPreLoRAState(NamedTuple):
  count: jax.Array        # int32, steps taken
  second_moment: PyTree   # like the params, float32: v_row (fan_in,) at lora_a, v_col (fan_out,) at lora_b, (0,) elsewhere


def _moment_shape(path, leaf) -> tuple[int]:
  name = sites.key_names(path)[-1]
  if name == "lora_a":
    return (leaf.shape[0],)
  if name == "lora_b":
    return (leaf.shape[1],)
  return (0,)


def scale_by_adaprelora(scale: float = 1.0, decay_rate: float = 0.8, eps: float = 1e-30,
                        delta: float = 1e-6) -> optax.GradientTransformation:
  """Replace each site's gradients by AdaPreLoRA's factor step (before the learning rate).

  Args:
    scale: the adapters' s (alpha / r): the factor step is divided by s so that
      the step of ``s a b`` approximates Adafactor's step on W.
    decay_rate: Adafactor's exponent c of ``beta_t = 1 - t^-c`` (optax default 0.8).
    eps: Adafactor's epsilon_1, added to the mean squares.
    delta: ridge added to the r x r Gram matrices before inversion.

  Returns:
    A transform whose ``update`` needs ``params``; its state holds, per site,
    float32 ``v_row`` (fan_in) and ``v_col`` (fan_out) and one int32 count.
  """
  for name, value in (("scale", scale), ("decay_rate", decay_rate), ("delta", delta)):
    lora._check_positive(name, value, "scale_by_adaprelora")
  if not eps >= 0:
    raise ValueError(f"scale_by_adaprelora: eps must be >= 0, got {eps!r}.")

  def init_fn(params):
    lora._check_pairs(sites.group(params, PAIR), "adaprelora")
    moments = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros(_moment_shape(path, p), jnp.float32), params)
    return ScaleByAdaPreLoRAState(jnp.zeros((), jnp.int32), moments)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("adaprelora: update needs params (the current factors).")
    factors = sites.group(params, PAIR)
    lora._check_pairs(factors, "adaprelora")
    moments = sites.group(state.second_moment, PAIR)
    count = state.count + 1
    beta = 1.0 - count.astype(jnp.float32) ** (-decay_rate)
    new_moments, steps = {}, {}
    for site, leaves in sites.group(grads, PAIR).items():
      a, b = (factors[site][k].astype(jnp.float32) for k in PAIR)
      g_a, g_b = (leaves[k].astype(jnp.float32) for k in PAIR)
      row, col = tangent_moments(g_a, g_b, a, b, delta)
      v_row = beta * moments[site]["lora_a"] + (1.0 - beta) * (row + eps)
      v_col = beta * moments[site]["lora_b"] + (1.0 - beta) * (col + eps)
      da, db = balanced_factor_step(g_a, g_b, a, b, *adafactor_factors(v_row, v_col), delta)
      new_moments[site] = {"lora_a": v_row, "lora_b": v_col}
      steps[site] = {"lora_a": (da / scale).astype(leaves["lora_a"].dtype),
                     "lora_b": (db / scale).astype(leaves["lora_b"].dtype)}
    second_moment = sites.map_sites(lambda s, _: new_moments[s], state.second_moment, PAIR)
    return sites.map_sites(lambda s, _: steps[s], grads, PAIR), ScaleByAdaPreLoRAState(count, second_moment)

  return optax.GradientTransformation(init_fn, update_fn)


def adaprelora_state_bytes(params, momentum=None, **unused) -> int:
  """4 (count) + 4 (fan_in + fan_out) per site, + the momentum (parameter dtype) if any."""
  del unused
  total = 4 + 4 * sum(a.shape[0] + b.shape[1] for a, b in
                      ((s["lora_a"], s["lora_b"]) for s in sites.group(params, PAIR).values()))
  if momentum is not None:
    total += registry.tree_bytes(params)
  return total


@registry.register("adaprelora", example={}, params="lora", state_bytes=adaprelora_state_bytes)
def adaprelora(learning_rate: optax.ScalarOrSchedule, scale: float = 1.0, momentum: float | None = None,
               decay_rate: float = 0.8, eps: float = 1e-30, delta: float = 1e-6
               ) -> optax.GradientTransformation:
  """AdaPreLoRA (Liu, Bian & Cai, 2026): `scale_by_adaprelora`, then SGD with optional momentum."""
  return optax.chain(scale_by_adaprelora(scale, decay_rate, eps, delta),
                     optax.sgd(learning_rate, momentum=momentum))

"""GoRA: gradient-driven rank allocation and initialization of LoRA.

He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation" (2025; official
code hhnqqq/MyTransformers, common/lora_modules/gora.py).

1. Calibration: the mean gradient ``G_l`` of the loss w.r.t. each frozen
   weight over N batches (`lowrank_jax.calibrate.collect`).
2. Importance ``I_l = f(W_l * G_l)`` (elementwise product): its Frobenius norm
   (the official default), nuclear norm or mean absolute value; normalized to
   ``p_l = I_l / sum I`` or by a temperature softmax of the min-max scaled
   importances.
3. Ranks under the parameter budget of a uniform-rank LoRA,
   ``budget = sum_l r_ref (d_in,l + d_out,l)``:
   ``r_l ~ budget p_l / (d_in,l + d_out,l)``, clipped to [min_rank, max_rank].
   The official code rounds each rank independently, so its total can exceed
   the budget; here the ranks are floored, then raised one at a time (largest
   shortfall first) while the budget allows, so the total never exceeds it
   and no further rank fits.
4. Init: A random, ``B = -(gamma/alpha) G A^T (A A^T)^{-1}`` (LoRA init
   'gora', `lowrank_jax.adapters.init.gora_init`); W0 not compensated by
   default, as in the official code (``reinit_weight=False``).
5. Scale: ``alpha / r_ref`` for every layer (official default), or
   ``alpha / r_l`` with ``dynamic_scaling=True``.

`allocate` turns attach rules with LoRA specs of rank ``r_ref`` into one rule
per site with its allocated rank; ``lrj.attach(model, rules, rngs=...,
calibration=stats)`` then builds the adapters.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from lowrank_jax.adapters import stats
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters import layers
from lowrank_jax.adapters.lora import LoRASpec
from lowrank_jax.attach import select

IMPORTANCES = ("frobenius", "nuclear", "mean")
NORMALIZATIONS = ("sum", "softmax")


def importance(w0, grad, kind: str = "frobenius") -> float:
  """``f(W0 * G)`` for f = Frobenius norm, nuclear norm or mean |.|."""
  product = jnp.asarray(w0, jnp.float32) * jnp.asarray(grad, jnp.float32)
  if kind == "frobenius":
    return float(jnp.linalg.norm(product))
  if kind == "nuclear":
    return float(jnp.sum(jnp.linalg.svd(product, compute_uv=False)))
  if kind == "mean":
    return float(jnp.mean(jnp.abs(product)))
  raise ValueError(f"gora: importance must be one of {list(IMPORTANCES)}, got {kind!r}.")


def normalize(scores: np.ndarray, how: str = "sum", temperature: float = 0.5) -> np.ndarray:
  """Importance shares summing to 1: ``I / sum I`` or the official temperature softmax."""
  scores = np.asarray(scores, np.float64)
  if how == "sum":
    total = scores.sum()
    if total <= 0:
      raise ValueError("gora: every site has zero importance (zero calibration gradients?).")
    return scores / total
  if how == "softmax":
    spread = scores.max() - scores.min()
    scaled = (scores - scores.min()) / (spread if spread > 0 else 1.0) / temperature
    e = np.exp(scaled - scaled.max())
    return e / e.sum()
  raise ValueError(f"gora: normalization must be one of {list(NORMALIZATIONS)}, got {how!r}.")


def allocate_ranks(shares: Sequence[float], features: Sequence[int], budget: int, *,
                   min_rank: int = 1, max_ranks: Sequence[int]) -> list[int]:
  """Integer ranks ~ ``budget * share / features`` with ``sum r * features <= budget``.

  Raises:
    ValueError: a budget below ``min_rank`` ranks on every layer.
  """
  features = np.asarray(features, np.int64)
  floor_cost = int(min_rank * features.sum())
  if budget < floor_cost:
    raise ValueError(
        f"gora: budget={budget} parameters is smaller than min_rank={min_rank} rank(s) on every "
        f"layer, which costs {floor_cost}; raise the budget or lower min_rank.")
  ideal = budget * np.asarray(shares, np.float64) / features
  caps = np.asarray(max_ranks, np.int64)
  ranks = np.clip(np.floor(ideal).astype(np.int64), min_rank, caps)
  while int(ranks @ features) > budget:  # min_rank clipping overspent: take from the richest
    over = np.where(ranks > min_rank, ranks - ideal, -np.inf)
    ranks[int(np.argmax(over))] -= 1
  while True:  # fill the rest, largest shortfall first
    room = budget - int(ranks @ features)
    fits = (features <= room) & (ranks < caps)
    if not fits.any():
      return [int(r) for r in ranks]
    short = np.where(fits, ideal - ranks, -np.inf)
    ranks[int(np.argmax(short))] += 1


def allocate(model, calibration, rules, *, budget: int | None = None, importance_kind: str = "frobenius",
             normalization: str = "sum", temperature: float = 0.5, min_rank: int = 1,
             max_rank: int | None = None, dynamic_scaling: bool = False) -> list[tuple[str, LoRASpec]]:
  """Per-site attach rules with GoRA-allocated ranks.

  Args:
    model: the model the rules select sites of (its frozen weights enter the
      importance).
    calibration: ``{path: SiteStats}`` with gradients for every site.
    rules: attach rules whose specs are LoRA-family specs of rank r_ref (use
      ``init='gora'`` for GoRA's initialization).
    budget: trainable rank parameters ``sum r_l (d_in + d_out)``; None: the
      uniform-rank LoRA's ``sum r_ref (d_in + d_out)``.
    importance_kind: 'frobenius', 'nuclear' or 'mean' (of W0 * G).
    normalization: 'sum' or 'softmax' (with ``temperature``).
    min_rank, max_rank: bounds of every rank (max also capped by the layer).
    dynamic_scaling: scale ``alpha / r_l`` instead of keeping ``alpha / r_ref``.

  Returns:
    ``[(re.escape(path), spec with the allocated rank)]``, one per site.

  Raises:
    ValueError: calibration for other sites, non-LoRA specs, bad options, a
      budget below ``min_rank`` on every layer.
  """
  if importance_kind not in IMPORTANCES:
    raise ValueError(f"gora: importance_kind must be one of {list(IMPORTANCES)}, got {importance_kind!r}.")
  if not isinstance(min_rank, int) or min_rank < 1:
    raise ValueError(f"gora: min_rank must be an integer >= 1, got {min_rank!r}.")
  if max_rank is not None and max_rank < min_rank:
    raise ValueError(f"gora: max_rank={max_rank} is below min_rank={min_rank}.")
  targets = select(model, rules)
  if not targets:
    raise ValueError("gora: the rules select no site.")
  names, views, specs, scores = [], [], [], []
  for _, name, module, spec in targets:
    if not isinstance(spec, LoRASpec):
      raise ValueError(f"gora at '{name}': rank allocation needs a LoRA-family spec, got "
                       f"{type(spec).__name__}.")
    view = layers.view_of(module, name)
    grad = stats.site_stats(calibration, name, "gora", "grad")
    if tuple(grad.shape) != (view.fan_in, view.fan_out):
      raise ValueError(f"gora at '{name}': calibration gradient of shape {tuple(grad.shape)} for a "
                       f"({view.fan_in}, {view.fan_out}) layer; collected on another model?")
    names.append(name)
    views.append(view)
    specs.append(spec)
    scores.append(importance(view.to_matrix(module.kernel[...]), grad, importance_kind))
  features = [v.fan_in + v.fan_out for v in views]
  if budget is None:
    budget = sum(s.rank * f for s, f in zip(specs, features))
  caps = []
  for spec, view in zip(specs, views):
    limit = (lora_init.gradient_rank_limit(spec.init, view.fan_in, view.fan_out)
             if lora_init.needs_grad(spec.init) else min(view.fan_in, view.fan_out))
    caps.append(limit if max_rank is None else min(limit, max_rank))
  if any(c < min_rank for c in caps):
    raise ValueError(f"gora: min_rank={min_rank} exceeds the largest rank of a layer ({min(caps)}).")
  ranks = allocate_ranks(normalize(np.asarray(scores), normalization, temperature), features,
                         budget, min_rank=min_rank, max_ranks=caps)
  return [(re.escape(name), _with_rank(spec, rank, dynamic_scaling))
          for name, spec, rank in zip(names, specs, ranks)]


def _with_rank(spec: LoRASpec, rank: int, dynamic_scaling: bool) -> LoRASpec:
  """``spec`` at ``rank``; unless dynamic, alpha rescaled so the scale stays (and GoRA's
  gamma with it, so that ``gamma / alpha`` of its init stays too)."""
  if dynamic_scaling:
    return spec.replace(rank=rank)
  alpha = spec.scale * (math.sqrt(rank) if spec.rslora else rank)
  changes = dict(rank=rank, alpha=alpha)
  if spec.init == "gora":  # keep GoRA's gamma / alpha
    gamma = spec.init_gamma if spec.init_gamma is not None else lora_init.GRADIENT_INITS[spec.init][1]
    changes["init_gamma"] = gamma * alpha / (spec.rank if spec.alpha is None else spec.alpha)
  return spec.replace(**changes)

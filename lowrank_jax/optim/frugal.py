"""FRUGAL: a state-full optimizer in a gradient subspace, a state-free one on the rest.

    Δ = -lr (scale * P inner(P^T g) + residual_scale * rule(g - P P^T g))

with ``rule`` signSGD (default) or SGD; in the paper's notation
``η₁ = lr * scale`` and ``η₂ = lr * residual_scale``, the update is full rank
while only the subspace part keeps optimizer state (Zmushko et al., "FRUGAL:
Memory-Efficient Optimization by Reducing State Overhead for Scalable
Training", 2025).

The subspace comes from any `projection.Projector` strategy (the paper's SVD
and random projections are ``'svd'`` and ``'random'``; its RandK coordinate
and BAdam block projections are not provided). ``policy='reset'`` is the
reference code's default (``reset_statistics=True``: fresh moments and a fresh
bias-correction count for the projected parameters at every refresh).

The reference code multiplies the residual learning rate by its
``proj_params_lr_scale`` too; here ``scale`` and ``residual_scale`` are
independent. With ``residual_scale=0`` FRUGAL is exactly `galore.galore`
with the same options (tested).
"""

from __future__ import annotations

from typing import Any

import optax

from lowrank_jax.optim.galore import _with_lr
from lowrank_jax.optim.galore import adam_state_bytes
from lowrank_jax.optim.galore import scale_by_galore
from lowrank_jax.optim import registry

RULES = ("sign", "sgd")


def scale_by_frugal(rank: Any = 128, refresh_every: int = 200, *, rule: str = "sign",
                    residual_scale: float = 1.0, policy: str = "reset",
                    **options) -> optax.GradientTransformation:
  """FRUGAL's direction: `galore.scale_by_galore` with a signSGD/SGD residual step.

  Args:
    rank, refresh_every: the subspace (see `projection.Projector`).
    rule: 'sign' (signSGD) or 'sgd' for the residual ``g - P P^T g``.
    residual_scale: η₂ / lr.
    policy: moments on refresh: 'reset' (default, as the reference), 'keep', 'rotate'.
    **options: passed to `galore.scale_by_galore` (strategy, inner, scale, side, ...).
  """
  if rule not in RULES:
    raise ValueError(f"Unknown FRUGAL residual rule {rule!r}; known: {list(RULES)}.")
  return scale_by_galore(rank, refresh_every, policy=policy, residual=rule,
                                    residual_scale=residual_scale, **options)


@registry.register("frugal", example={"rank": 4, "refresh_every": 2, "residual_scale": 0.1},
                   state_bytes=adam_state_bytes)
def frugal(
    learning_rate: optax.ScalarOrSchedule,
    rank: Any = 128,
    refresh_every: int = 200,
    rule: str = "sign",
    residual_scale: float = 1.0,
    policy: str = "reset",
    strategy: str = "svd",
    scale: float = 1.0,
    inner: optax.GradientTransformation | None = None,
    side: str = "smaller",
    row_axes: Any = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
  """FRUGAL: ``W <- W - lr (scale P Adam(P^T g) + residual_scale rule(g - P P^T g) + wd W)``.

  The paper uses ``residual_scale=1`` for pretraining and 0.1 for
  fine-tuning; the subspace strategy is any of `projection.STRATEGIES`.
  """
  return _with_lr(
      scale_by_frugal(rank, refresh_every, rule=rule, residual_scale=residual_scale, policy=policy,
                      strategy=strategy, scale=scale, inner=inner, side=side, row_axes=row_axes,
                      seed=seed),
      learning_rate, weight_decay, mask)

"""Cautious weight decay: decay only where the update and the parameter agree in sign.

Chen et al., "Cautious Weight Decay" (2025):

    x <- x - lr (u + lambda * 1[u * x >= 0] * x)

where ``u`` is the base optimizer's update direction (before ``-lr``). A
coordinate whose update already moves it towards zero (``u x >= 0``) is also
decayed; one the optimizer pushes away from zero is not. No state, no new
hyperparameter: it replaces ``optax.add_decayed_weights`` in any chain, after
the direction and before the learning rate, e.g.
``optax.chain(scale_by_muon(), cautious_weight_decay(0.1),
optax.scale_by_learning_rate(lr))``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import registry


def cautious_weight_decay(weight_decay: float = 0.0,
                          mask: Any | Callable[[Any], Any] | None = None
                          ) -> optax.GradientTransformation:
  """``u + weight_decay * 1[u * x >= 0] * x``, leaf by leaf (needs ``params``).

  Args:
    weight_decay: lambda >= 0.
    mask: a tree of bools (or a callable returning one) selecting the leaves
      to decay, as in ``optax.add_decayed_weights``; None decays every leaf.
  """
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(f"cautious_weight_decay: weight_decay must be >= 0, got {weight_decay!r}.")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("cautious_weight_decay needs the parameters: call update(grads, state, params).")

    def decay(u, x):
      agree = (u.astype(jnp.float32) * x.astype(jnp.float32)) >= 0
      return (u + weight_decay * jnp.where(agree, x, jnp.zeros_like(x))).astype(u.dtype)

    return jax.tree.map(decay, updates, params), state

  tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
  return optax.masked(tx, mask) if mask is not None else tx


def cautious_adamw_state_bytes(params, **unused) -> int:
  """Adam's int32 count, mu and nu (parameter dtype); cautious decay has no state."""
  del unused
  return 4 + 2 * sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


@registry.register("cautious_adamw", example={"weight_decay": 0.1},
                   state_bytes=cautious_adamw_state_bytes)
def cautious_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 1e-4, *, mask: Any = None,
                   nesterov: bool = False) -> optax.GradientTransformation:
  """AdamW with cautious weight decay: ``optax.adamw`` with its decay made cautious.

  Equal to ``optax.adamw`` wherever ``u * x >= 0`` for every coordinate (and
  to ``optax.adam`` when weight_decay = 0).
  """
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, nesterov=nesterov),
                     cautious_weight_decay(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))

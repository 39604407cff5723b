"""Spectral-condition (muP-style) initialization scales and learning-rate multipliers.

Yang, Simon & Bernstein, "A Spectral Condition for Feature Learning" (2023):
feature learning at every width holds when each weight and each update has
spectral norm Theta(sqrt(fan_out / fan_in)). For a (fan_in, fan_out) matrix:

* init: entries with standard deviation
  ``sigma = fan_in^{-1/2} min(1, sqrt(fan_out / fan_in))`` (`init_std`);
* learning rate, by the kind of update (`lr_multiplier`):
  'sgd' (gradient updates, near rank one): ``fan_out / fan_in``;
  'adam' (sign-like updates, ``||sign(G)||_* ~ sqrt(fan_in fan_out)``): ``1 / fan_in``;
  'orthogonal' (Muon-style, ``||O||_* = 1``): ``sqrt(fan_out / fan_in)``.

Multipliers are relative to a base shape (``base_fans``, default (1, 1)), so
that at the base width every multiplier is 1 and a tuned global learning
rate transfers. Vectors and scalars (biases, norms, gains) get multiplier 1.
`spectral_labels` and `spectral_optimizer` turn the multipliers into an
``optax.partition`` over the parameter tree; ``fans`` lets structured layers
(Monarch/BTT cores, low-rank factors) state each leaf's own contracted and
produced sizes instead of the default (prod(shape[:-1]), shape[-1]).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import optax

from lowrank_jax.optim import labels

UPDATES = ("sgd", "adam", "orthogonal")
Fans = Callable[[tuple, Any], "tuple[int, int] | None"]


def _check_fans(fan_in: int, fan_out: int) -> None:
  if fan_in < 1 or fan_out < 1:
    raise ValueError(f"fan_in and fan_out must be >= 1, got {fan_in}, {fan_out}.")


def init_std(fan_in: int, fan_out: int) -> float:
  """``fan_in^{-1/2} min(1, sqrt(fan_out / fan_in))``: spectral norm Theta(sqrt(fan_out/fan_in))."""
  _check_fans(fan_in, fan_out)
  return min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)


def _rule(fan_in: int, fan_out: int, update: str) -> float:
  if update == "sgd":
    return fan_out / fan_in
  if update == "adam":
    return 1.0 / fan_in
  return math.sqrt(fan_out / fan_in)


def lr_multiplier(fan_in: int, fan_out: int, update: str = "adam",
                  base_fans: tuple[int, int] = (1, 1)) -> float:
  """The learning-rate multiplier of a (fan_in, fan_out) weight relative to ``base_fans``."""
  if update not in UPDATES:
    raise ValueError(f"update must be one of {UPDATES}, got {update!r}.")
  _check_fans(fan_in, fan_out)
  _check_fans(*base_fans)
  return _rule(fan_in, fan_out, update) / _rule(*base_fans, update)


def matrix_fans(path: tuple, leaf: Any) -> tuple[int, int] | None:
  """Default fans of a leaf: (prod(shape[:-1]), shape[-1]) for >= 2-D leaves, else None."""
  del path
  shape = getattr(leaf, "shape", ())
  if len(shape) < 2:
    return None
  return math.prod(shape[:-1]), shape[-1]


def _multiplier_of(update: str, base_fans: tuple[int, int], fans: Fans):
  """``(path, leaf) -> multiplier``: 1 for leaves without fans (vectors, scalars)."""
  def multiplier_of(path, leaf):
    f = fans(path, leaf)
    return 1.0 if f is None else lr_multiplier(*f, update=update, base_fans=base_fans)
  return multiplier_of


def spectral_labels(params: Any, update: str = "adam", base_fans: tuple[int, int] = (1, 1),
                    fans: Fans = matrix_fans) -> Any:
  """A tree like ``params`` of labels ``'lr_x<multiplier>'`` (for ``optax.partition``)."""
  multiplier_of = _multiplier_of(update, base_fans, fans)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: f"lr_x{multiplier_of(path, leaf):.6g}", params)


def spectral_optimizer(make_tx: Callable[[Any], optax.GradientTransformation],
                       learning_rate: float | optax.Schedule, params: Any, update: str = "adam",
                       base_fans: tuple[int, int] = (1, 1),
                       fans: Fans = matrix_fans) -> optax.GradientTransformation:
  """``make_tx(learning_rate * multiplier)`` per leaf (`optim.labels.partition_by_multiplier`).

  Example: ``spectral_optimizer(optax.adam, 3e-3, params, base_fans=(64, 64))``.
  """
  multiplier_of = _multiplier_of(update, base_fans, fans)
  multipliers = [multiplier_of(p, leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)]
  return labels.partition_by_multiplier(make_tx, learning_rate, multiplier_of, multipliers)

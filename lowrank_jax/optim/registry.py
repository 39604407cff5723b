"""The registry of lowrank_jax optimizers: optax GradientTransformation factories by name.

``lrj.optim.get(name, **hyperparams)`` calls the factory registered as ``name``;
``lrj.optim.names()`` lists them. A factory is registered with
``@register("name", example=dict(...))``: ``example`` holds hyperparameters
(besides ``learning_rate``) that make the transform apply to the small
parameters of the shared test matrix (tests/optim/optimizer_contract_test.py), e.g. a
rank below their dims. ``params`` names the kind of parameters the transform
applies to in that matrix: 'dense' (plain matrices and vectors) or 'lora'
(adapter sites holding ``lora_a`` (fan_in, r) and ``lora_b`` (r, fan_out)
leaves, for pair-aware LoRA optimizers). ``example`` may also hold a
``learning_rate`` that replaces the matrix's default one.

``state_bytes(params, **example)``, if given, is the method's closed-form
optimizer-state size in bytes for ``params`` (a pytree of arrays or
``jax.ShapeDtypeStruct``) under the hyperparameters ``example``; the contract
tests compare it with the bytes of the real state pytree.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax

Factory = Callable[..., optax.GradientTransformation]


class Entry(NamedTuple):
  factory: Factory
  example: dict[str, Any]
  params: str
  state_bytes: Callable[..., int] | None = None


_REGISTRY: dict[str, Entry] = {}


def register(name: str, *, example: dict[str, Any] | None = None,
             params: str = "dense",
             state_bytes: Callable[..., int] | None = None) -> Callable[[Factory], Factory]:
  """Decorator registering an optimizer factory under ``name``."""
  if params not in ("dense", "lora"):
    raise ValueError(f"register({name!r}): params must be 'dense' or 'lora', got {params!r}.")

  def decorate(factory: Factory) -> Factory:
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
      raise ValueError(f"Optimizer name {name!r} is already registered by {_REGISTRY[name].factory}.")
    _REGISTRY[name] = Entry(factory, dict(example or {}), params, state_bytes)
    return factory

  return decorate


def names() -> list[str]:
  """Names of all registered optimizers, sorted."""
  return sorted(_REGISTRY)


def entry(name: str) -> Entry:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown lowrank_jax optimizer {name!r}; known optimizers: {names()}.")
  return _REGISTRY[name]


def get(name: str, **hyperparams) -> optax.GradientTransformation:
  """The transform ``name`` built with ``hyperparams``.

  Raises:
    ValueError: unknown name (the known ones are listed) or a hyperparameter
      the factory does not take (the accepted ones are listed).
  """
  factory = entry(name).factory
  signature = inspect.signature(factory)
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
  unknown = sorted(set(hyperparams) - set(signature.parameters))
  if unknown and not takes_any:
    raise ValueError(f"Unknown hyperparameters {unknown} for optimizer {name!r}; accepted: "
                     f"{sorted(signature.parameters)}.")
  return factory(**hyperparams)


def tree_bytes(tree) -> int:
  """Bytes of the leaves of a pytree of arrays or ``jax.ShapeDtypeStruct`` (for state formulas)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

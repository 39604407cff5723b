"""Step-boundary events: changes to the model and optimizer state between steps.

An event is called by the training loop (or a user's loop) after the optimizer
step of every step at which ``event.due(step)`` holds:

    model, opt_state = event(model, opt_state, step)

``model`` is the NNX model (graph and state merged), ``opt_state`` the optax
state of the trainable parameters. Events implement POET's
merge-then-reinitialize, ReLoRA restarts, SwitchLoRA switching, AdaLoRA's
budget pruning and subspace refreshes. An event must not change the model's
structure (only values), and any randomness it uses must be a function of
``(seed, step)`` so that a resumed run repeats it exactly.

Optimizer-state surgery: optax states mirror the parameter tree in their
moment leaves (Adam's ``mu`` and ``nu``, momentum traces, ...). `map_param_state`
applies a function to every optimizer-state leaf that belongs to one parameter
(found by its path in the model and its shape); `zero_param_state`,
`zero_param_state_slices` and `prune_param_state` build on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
ParamPath = tuple[Any, ...]


@runtime_checkable
class Event(Protocol):
  """The step-boundary event protocol."""

  def due(self, step: int) -> bool:
    """Whether the event runs after optimizer step ``step`` (1-based)."""

  def __call__(self, model: nnx.Module, opt_state: Any, step: int) -> tuple[nnx.Module, Any]:
    """The model and optimizer state after the event."""


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Base of events that run every ``every`` steps (after steps every, 2 every, ...).

  Subclasses implement ``__call__``. ``stop`` (optional) is the last step at
  which the event may run.
  """

  every: int = 100
  stop: int | None = None

  def __post_init__(self):
    if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
      raise ValueError(
          f"{type(self).__name__}: event period `every` must be an integer >= 1, got {self.every!r}.")
    if self.stop is not None and self.stop < 1:
      raise ValueError(f"{type(self).__name__}: stop must be >= 1 or None, got {self.stop!r}.")

  def due(self, step: int) -> bool:
    return step % self.every == 0 and (self.stop is None or step <= self.stop)

  def step_key(self, seed: int, step: int) -> Array:
    """The PRNG key of the event at ``step``: a function of (seed, step) only."""
    return jax.random.fold_in(jax.random.key(seed), step)


# -- optimizer-state surgery ------------------------------------------------------------
def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _contains(names: Sequence[str], target: Sequence[str]) -> bool:
  n = len(target)
  return any(tuple(names[i:i + n]) == tuple(target) for i in range(len(names) - n + 1))


def map_param_state(opt_state: Any, param_path: ParamPath, shape: tuple[int, ...],
                    fn: Callable[[Array], Array]) -> Any:
  """Apply ``fn`` to every optimizer-state leaf of the parameter at ``param_path``.

  A leaf belongs to the parameter when its key path contains ``param_path``
  (the parameter's path from the model root, e.g.
  ``('blocks', 0, 'attn', 'query', 'lora_a')``) and its shape is ``shape``:
  Adam's ``mu`` and ``nu`` of that parameter, but not the step count.

  Raises:
    ValueError: no leaf of ``opt_state`` belongs to the parameter (a wrong
      path, or a stateless optimizer such as plain SGD is fine: it returns the
      state unchanged only if ``opt_state`` has no array leaves at all).
  """
  target = [str(p) for p in param_path]
  found = []

  def visit(path, leaf):
    if (hasattr(leaf, "shape") and tuple(leaf.shape) == tuple(shape)
        and _contains([_key_name(e) for e in path], target)):
      found.append(path)
      return fn(leaf)
    return leaf

  new_state = jax.tree_util.tree_map_with_path(visit, opt_state)
  has_arrays = any(hasattr(x, "shape") and x.ndim > 0 for x in jax.tree_util.tree_leaves(opt_state))
  if not found and has_arrays:
    raise ValueError(f"No optimizer-state leaf of shape {tuple(shape)} belongs to the parameter "
                     f"'{'/'.join(target)}'.")
  return new_state


def zero_param_state(opt_state: Any, param_path: ParamPath, shape: tuple[int, ...]) -> Any:
  """Zero every optimizer-state leaf of one parameter (a full reset of its moments)."""
  return map_param_state(opt_state, param_path, shape, jnp.zeros_like)


def zero_param_state_slices(opt_state: Any, param_path: ParamPath, shape: tuple[int, ...],
                            index: Array, axis: int) -> Any:
  """Zero the entries ``index`` along ``axis`` of one parameter's optimizer state.

  E.g. ``axis=1, index=[2, 5]`` zeros the Adam moments of columns 2 and 5 of a
  (fan_in, r) factor and leaves every other entry untouched.
  """
  index = jnp.asarray(index, jnp.int32)

  def zero(leaf):
    mask = jnp.zeros(leaf.shape[axis], bool).at[index].set(True)
    mask = mask.reshape([-1 if a == axis % leaf.ndim else 1 for a in range(leaf.ndim)])
    return jnp.where(mask, jnp.zeros_like(leaf), leaf)

  return map_param_state(opt_state, param_path, shape, zero)


def prune_param_state(opt_state: Any, param_path: ParamPath, shape: tuple[int, ...],
                      fraction: float) -> Any:
  """Zero the ``fraction`` smallest-magnitude entries of each of one parameter's state leaves.

  ReLoRA's partial optimizer reset (Lialin et al., 2023): magnitude pruning
  of the Adam moments at each restart. ``fraction=1`` zeros everything.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"prune fraction must be in [0, 1], got {fraction!r}.")

  def prune(leaf):
    k = int(round(fraction * leaf.size))
    if k == 0:
      return leaf
    flat = jnp.abs(leaf).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    keep = jnp.ones(flat.shape, bool).at[order[:k]].set(False)
    return jnp.where(keep.reshape(leaf.shape), leaf, jnp.zeros_like(leaf))

  return map_param_state(opt_state, param_path, shape, prune)


def modules_of_type(model: nnx.Module, cls: type) -> list[tuple[ParamPath, nnx.Module]]:
  """(path, module) for every submodule of ``model`` that is an instance of ``cls``."""
  return [(tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, cls)]


# -- registry -------------------------------------------------------------------------------
_EVENTS: dict[str, type] = {}


def register(name: str):
  """Class decorator registering an event class by name (for configs: ``(name, kwargs)``)."""

  def decorate(cls):
    if name in _EVENTS and _EVENTS[name] is not cls:
      raise ValueError(f"Event name {name!r} is already registered by {_EVENTS[name]}.")
    _EVENTS[name] = cls
    return cls

  return decorate


def names() -> list[str]:
  """Registered event names, sorted."""
  return sorted(_EVENTS)


def build(name: str, **kwargs) -> Event:
  """The event ``name`` built with ``kwargs``; unknown names and fields raise with the choices."""
  if name not in _EVENTS:
    raise ValueError(f"Unknown event {name!r}; known events: {names()}.")
  cls = _EVENTS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"Unknown arguments {unknown} for event {name!r}; accepted: {sorted(fields)}.")
  return cls(**kwargs)

"""Step-boundary events: changes to the model and optimizer state between steps.

An event is called by the training loop (or a user's loop) after the optimizer
step of every step at which ``event.due(step)`` holds:

    model, opt_state = event(model, opt_state, step)

``model`` is the NNX model (graph and state merged), ``opt_state`` the optax
state of the trainable parameters. Events implement POET's
merge-then-reinitialize, ReLoRA restarts, SwitchLoRA switching, AdaLoRA's
budget pruning and subspace refreshes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flax import nnx


@runtime_checkable
class Event(Protocol):
  """The step-boundary event protocol."""

  def due(self, step: int) -> bool:
    """Whether the event runs after optimizer step ``step`` (1-based)."""

  def __call__(self, model: nnx.Module, opt_state: Any, step: int) -> tuple[nnx.Module, Any]:
    """The model and optimizer state after the event."""

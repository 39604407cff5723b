"""ReLoRA: high-rank training by repeatedly merging and restarting low-rank updates.

Lialin, Shivagunde, Muckatira & Rumshisky, "ReLoRA: High-Rank Training Through
Low-Rank Updates" (2023). The layer is LoRA, ``y = x W0 + s (x A) B``; every T
steps the restart event (`ReLoRARestart`)

    W0 <- W0 + s A B,   A <- fresh kaiming-uniform draw,   B <- 0,

(the function is unchanged at the restart) and partially resets the
optimizer: in every optimizer-state leaf of A and B (Adam's moments) the
``prune_fraction`` smallest-magnitude entries are zeroed (the paper prunes
99%). A sum of rank-r updates reaches rank beyond r.

The paper's jagged schedule, a short linear learning-rate re-warm-up after
each restart on top of the base schedule, is `jagged_schedule` (the training
configs' ``optimizer.restart_every`` / ``restart_warmup_steps``). Not
implemented here: its full-rank warm start (train with method 'full' first and
pass ``init_from``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters.lora import LoRA
from lowrank_jax.adapters.lora import LoRASpec
from lowrank_jax.reparam import events


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class ReLoRASpec(LoRASpec):
  """ReLoRA hyperparameters: LoRA's (the restart period is the event's ``every``)."""

  name = "relora"

  @property
  def adapter_type(self) -> type["ReLoRA"]:
    return ReLoRA


class ReLoRA(LoRA):
  """A LoRA layer that can fold its update into W0 and restart (`restart`)."""

  def restart(self, key: jax.Array) -> None:
    """``W0 <- W0 + s A B``, A redrawn (kaiming-uniform), B <- 0 (a lora_bias is kept)."""
    self.base.kernel[...] = self.effective_kernel()
    fan_in, fan_out = self.view.fan_in, self.view.fan_out
    w0_shape = jnp.zeros((fan_in, fan_out), jnp.float32)
    fresh = lora_init.default_init(key, w0_shape, self.spec.rank, self.scale)
    self.lora_a[...] = fresh.a.astype(self.lora_a.dtype)
    self.lora_b[...] = jnp.zeros_like(self.lora_b[...])


@events.register("relora_restart")
@dataclasses.dataclass(frozen=True)
class ReLoRARestart(events.Periodic):
  """Merge-and-restart every ReLoRA layer every ``every`` steps, pruning its optimizer state.

  Attributes:
    prune_fraction: share in [0, 1] of each moment leaf of A and B zeroed by
      magnitude (0.99 in the paper; 1.0 is a full reset).
    seed: with the step, determines the new A factors.
  """

  prune_fraction: float = 0.99
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.prune_fraction <= 1.0:
      raise ValueError(f"relora_restart: prune_fraction must be in [0, 1], got {self.prune_fraction!r}.")

  def __call__(self, model, opt_state, step):
    key = self.step_key(self.seed, step)
    for i, (path, layer) in enumerate(events.modules_of_type(model, ReLoRA)):
      layer.restart(jax.random.fold_in(key, i))
      for leaf in ("lora_a", "lora_b"):
        opt_state = events.prune_param_state(opt_state, path + (leaf,), getattr(layer, leaf).shape,
                                             self.prune_fraction)
    return model, opt_state


def jagged_schedule(schedule: optax.Schedule, every: int, warmup_steps: int) -> optax.Schedule:
  """``schedule`` times a linear re-warm-up after every restart (ReLoRA's jagged schedule).

  Restarts run after updates every, 2 every, ... (`ReLoRARestart`), so update
  ``t >= every`` (0-based optax count) is ``p = t mod every`` updates past the
  last restart and gets ``schedule(t) * min(1, (p + 1) / warmup_steps)``;
  updates before the first restart get ``schedule(t)`` unchanged.
  """
  for name, value in (("every", every), ("warmup_steps", warmup_steps)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"jagged_schedule: {name} must be an integer >= 1, got {value!r}.")
  if warmup_steps > every:
    raise ValueError(f"jagged_schedule: warmup_steps={warmup_steps} exceeds the restart period "
                     f"every={every}.")

  def jagged(count):
    past_restart = jnp.mod(count, every)
    ramp = jnp.minimum(1.0, (past_restart + 1) / warmup_steps)
    return schedule(count) * jnp.where(count >= every, ramp, 1.0)

  return jagged

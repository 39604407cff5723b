"""SwitchLoRA: LoRA whose factor vectors are switched, a few at a time, to candidates.

Zhou, Wang, ... , "SwitchLoRA: Switched Low-Rank Adaptation Can Learn
Full-Rank Information" (2024). The layer is LoRA, ``W = W0 + s A B`` with A
(fan_in, r) and B (r, fan_out) (the paper's B columns are our B rows ``b_i``,
its A rows our A columns ``a_i``). Each layer keeps frozen candidate pools
``C_A`` (fan_in, m) and ``C_B`` (m, fan_out). A switch of ``b_i`` to the
candidate ``c``:

    W0 <- W0 + s a_i (b_i - c)^T,   b_i <- c,   c <- b_i (back into the pool),

so the function is unchanged; likewise for ``a_i``:
``W0 <- W0 + s (a_i - c) b_i^T``. The optimizer moments of the switched
vectors are zeroed (`SwitchLoRASwitch`).

Differences from the paper / official code (github.com/...SwitchLoRA, as
summarized in the method notes, not checked line by line): the number of
vectors switched per event is a fixed ``count`` (the paper decays the switch
rate exponentially); the counterpart vector is not frozen for the following
Adam warm-up steps; the candidates are drawn from the factors' kaiming-uniform
distribution (bound 1/sqrt(fan_in) for A-candidates, 1/sqrt(r) for
B-candidates), a choice of ours.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.adapters.lora import LoRA
from lowrank_jax.adapters.lora import LoRASpec
from lowrank_jax.reparam import events


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SwitchLoRASpec(LoRASpec):
  """SwitchLoRA hyperparameters: LoRA's plus the candidate pool size.

  Attributes:
    candidates: m >= 1 candidate vectors per factor; None means m = rank.
  """

  name = "switchlora"
  candidates: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.candidates is not None and (not isinstance(self.candidates, int) or self.candidates < 1):
      raise ValueError(f"switchlora: candidates must be an integer >= 1 or None, got {self.candidates!r}.")
    if self.use_bias:
      raise ValueError("switchlora: use_bias is not supported.")

  @property
  def pool_size(self) -> int:
    return self.rank if self.candidates is None else self.candidates

  @property
  def adapter_type(self) -> type["SwitchLoRA"]:
    return SwitchLoRA


class SwitchLoRA(LoRA):
  """LoRA plus frozen candidate pools ``candidates_a`` (fan_in, m), ``candidates_b`` (m, fan_out)."""

  def __init__(self, base: nnx.Module, spec: SwitchLoRASpec, view: layers.LayerView,
               path: str = "", *, rngs: nnx.Rngs, grad: jax.Array | None = None):
    super().__init__(base, spec, view, path, rngs=rngs, grad=grad)
    key_a, key_b = jax.random.split(rngs.params())
    m, dtype = spec.pool_size, self.lora_a.dtype
    bound_a, bound_b = 1.0 / math.sqrt(view.fan_in), 1.0 / math.sqrt(spec.rank)
    self.candidates_a = adapter_base.AdapterBuffer(
        jax.random.uniform(key_a, (view.fan_in, m), jnp.float32, -bound_a, bound_a).astype(dtype))
    self.candidates_b = adapter_base.AdapterBuffer(
        jax.random.uniform(key_b, (m, view.fan_out), jnp.float32, -bound_b, bound_b).astype(dtype))

  def _add_to_w0(self, delta: jax.Array) -> None:
    kernel = self.base.kernel
    w0 = self.view.to_matrix(kernel[...]).astype(jnp.float32) + delta
    kernel[...] = self.view.from_matrix(w0).astype(kernel.dtype)

  def switch_b(self, rows: jax.Array, picks: jax.Array) -> None:
    """Swap B rows ``rows`` with candidates ``picks`` (distinct), correcting W0."""
    a = self.lora_a[...].astype(jnp.float32)[:, rows]
    old = self.lora_b[...][rows]
    new = self.candidates_b[...][picks]
    self._add_to_w0(self.scale * a @ (old.astype(jnp.float32) - new.astype(jnp.float32)))
    self.lora_b[...] = self.lora_b[...].at[rows].set(new)
    self.candidates_b[...] = self.candidates_b[...].at[picks].set(old)

  def switch_a(self, cols: jax.Array, picks: jax.Array) -> None:
    """Swap A columns ``cols`` with candidates ``picks`` (distinct), correcting W0."""
    b = self.lora_b[...].astype(jnp.float32)[cols]
    old = self.lora_a[...][:, cols]
    new = self.candidates_a[...][:, picks]
    self._add_to_w0(self.scale * (old.astype(jnp.float32) - new.astype(jnp.float32)) @ b)
    self.lora_a[...] = self.lora_a[...].at[:, cols].set(new)
    self.candidates_a[...] = self.candidates_a[...].at[:, picks].set(old)


@events.register("switchlora_switch")
@dataclasses.dataclass(frozen=True)
class SwitchLoRASwitch(events.Periodic):
  """Every ``every`` steps, switch ``count`` random B rows and A columns of every SwitchLoRA layer.

  The Adam moments (every optimizer-state leaf) of exactly the switched B rows
  and A columns are zeroed; nothing else in the optimizer state changes.
  """

  every: int = 1
  count: int = 1
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.count, int) or self.count < 1:
      raise ValueError(f"switchlora_switch: count must be an integer >= 1, got {self.count!r}.")

  def __call__(self, model, opt_state, step):
    key = self.step_key(self.seed, step)
    for i, (path, layer) in enumerate(events.modules_of_type(model, SwitchLoRA)):
      rank, pool = layer.spec.rank, layer.spec.pool_size
      count = min(self.count, rank, pool)
      keys = jax.random.split(jax.random.fold_in(key, i), 4)
      rows = jax.random.choice(keys[0], rank, (count,), replace=False)
      layer.switch_b(rows, jax.random.choice(keys[1], pool, (count,), replace=False))
      cols = jax.random.choice(keys[2], rank, (count,), replace=False)
      layer.switch_a(cols, jax.random.choice(keys[3], pool, (count,), replace=False))
      opt_state = events.zero_param_state_slices(opt_state, path + ("lora_b",), layer.lora_b.shape,
                                                 rows, axis=0)
      opt_state = events.zero_param_state_slices(opt_state, path + ("lora_a",), layer.lora_a.shape,
                                                 cols, axis=1)
    return model, opt_state

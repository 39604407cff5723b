"""SwitchLoRA: LoRA whose factor vectors are switched, a few at a time, to candidates.

Zhou, Wang et al., "SwitchLoRA: Switched Low-Rank Adaptation Can Learn
Full-Rank Information" (2024); official code github.com/asfsdsf/SwitchLoRA
(switchlora/switch_lora.py, lora_utils.py). The layer is LoRA, ``W = W0 + s A
B`` with A (fan_in, r) and B (r, fan_out) (the official lora_A rows are our A
columns ``a_i``, its lora_B columns our B rows ``b_i``). Each layer keeps
frozen candidate pools ``C_A`` (fan_in, m) and ``C_B`` (m, fan_out). A switch
of ``b_i`` to the candidate ``c``:

    W0 <- W0 + s a_i (b_i - c)^T,   b_i <- c,   c <- b_i (back into the pool),

so the function is unchanged; likewise for ``a_i``:
``W0 <- W0 + s (a_i - c) b_i^T``. The optimizer moments of the switched
vectors are zeroed (`SwitchLoRASwitch`).

Initialization as in the official code (``init='default'``): the official
layer draws ``min(fan_in, fan_out)`` candidates per factor, r of them in use
as the factors' vectors, so the pools hold ``m = min(fan_in, fan_out) - r``
and the factors are drawn from the same distributions (B is not zero: the
layer is not the base layer at init). A-vectors ~ U(+-sqrt(3) sigma_A),
B-vectors ~ U(+-sqrt(3) sigma_B) with

    sigma_A = (sqrt(fan_out) r / fan_in^{3/2})^{1/4} sqrt(g),
    sigma_B = (r / sqrt(fan_in fan_out))^{1/4} sqrt(g),   g = sqrt(1/3)

(``g`` is PyTorch's leaky-ReLU gain for slope sqrt(5)); with the official
scaling ``s = alpha / r``, alpha = 1 (our default here), the entries of s A B
have variance 1 / (3 fan_in). Other LoRA inits (``init != 'default'``) set A
and B as for LoRA; the pools are drawn as above.

Switching schedule (`SwitchLoRASwitch`): either a fixed ``count`` per event,
or the official schedule: with base ``interval`` (official 40) and
``descend_steps``, ``rank * rate(t) / interval`` vectors per step, stochastically
rounded, ``rate(t) = 0.3^((t + 1) / descend_steps)`` (the switch frequency
decays exponentially to 30% at ``descend_steps``; None keeps it constant).

Differences from the official code: switched indices and candidates are
drawn at random without replacement (the official default walks through
them cyclically); the counterpart vector is not frozen for the 5 steps after
a switch; optax keeps one step count per leaf, so only the moments (not a
per-entry step count) of switched vectors are reset.
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

  Defaults differ from LoRA's: rank 4 (fits layers of 8 features with a
  pool), alpha 1 (the official scaling 1 / r).

  Attributes:
    candidates: m >= 1 candidate vectors per factor; None means the
      official m = min(fan_in, fan_out) - rank.
  """

  name = "switchlora"
  rank: int = 4
  alpha: float | None = 1.0
  candidates: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.candidates is not None and (not isinstance(self.candidates, int) or self.candidates < 1):
      raise ValueError(f"switchlora: candidates must be an integer >= 1 or None, got {self.candidates!r}.")
    if self.use_bias:
      raise ValueError("switchlora: use_bias is not supported.")

  def pool_size(self, fan_in: int, fan_out: int) -> int:
    return min(fan_in, fan_out) - self.rank if self.candidates is None else self.candidates

  def validate(self, view: layers.LayerView, path: str) -> None:
    super().validate(view, path)
    if self.pool_size(view.fan_in, view.fan_out) < 1:
      raise ValueError(
          f"switchlora at '{path}': rank={self.rank} leaves no candidates, min(fan_in, fan_out) - "
          f"rank = {min(view.fan_in, view.fan_out) - self.rank}; give candidates >= 1 or a "
          "smaller rank.")

  def init_bounds(self, fan_in: int, fan_out: int) -> tuple[float, float]:
    """Bounds of the uniform A- and B-vectors (official ``get_init_lora_bound``)."""
    root_gain = (1.0 / 3.0) ** 0.25
    r = self.rank
    sigma_a = (math.sqrt(fan_out) * r / fan_in ** 1.5) ** 0.25 * root_gain
    sigma_b = (r / math.sqrt(fan_in * fan_out)) ** 0.25 * root_gain
    return math.sqrt(3.0) * sigma_a, math.sqrt(3.0) * sigma_b

  @property
  def adapter_type(self) -> type["SwitchLoRA"]:
    return SwitchLoRA


class SwitchLoRA(LoRA):
  """LoRA plus frozen candidate pools ``candidates_a`` (fan_in, m), ``candidates_b`` (m, fan_out)."""

  identity_at_init = False  # the official init draws B != 0

  def __init__(self, base: nnx.Module, spec: SwitchLoRASpec, view: layers.LayerView,
               path: str = "", *, rngs: nnx.Rngs, grad: jax.Array | None = None):
    super().__init__(base, spec, view, path, rngs=rngs, grad=grad)
    fan_in, fan_out, r = view.fan_in, view.fan_out, spec.rank
    m, dtype = spec.pool_size(fan_in, fan_out), self.lora_a.dtype
    bound_a, bound_b = spec.init_bounds(fan_in, fan_out)
    key_a, key_b = jax.random.split(rngs.params())
    vectors_a = jax.random.uniform(key_a, (fan_in, m + r), jnp.float32, -bound_a, bound_a)
    vectors_b = jax.random.uniform(key_b, (m + r, fan_out), jnp.float32, -bound_b, bound_b)
    self.candidates_a = adapter_base.AdapterBuffer(vectors_a[:, :m].astype(dtype))
    self.candidates_b = adapter_base.AdapterBuffer(vectors_b[:m].astype(dtype))
    if spec.init == "default":
      self.lora_a[...] = vectors_a[:, m:].astype(dtype)
      self.lora_b[...] = vectors_b[m:].astype(dtype)

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


def switch_rate(step: int, descend_steps: int | None) -> float:
  """Official exponential decay ``0.3^((step + 1) / descend_steps)`` (floored at 1e-8); 1 if None."""
  if descend_steps is None:
    return 1.0
  return max(0.3 ** ((step + 1) / descend_steps), 1e-8)


def scheduled_count(key: jax.Array, rank: int, step: int, every: int, interval: float,
                    descend_steps: int | None) -> int:
  """``every * rank * rate(step) / interval`` vectors, stochastically rounded (official schedule)."""
  expected = every * rank * switch_rate(step, descend_steps) / interval
  whole = math.floor(expected)
  return whole + int(float(jax.random.uniform(key)) < expected - whole)


@events.register("switchlora_switch")
@dataclasses.dataclass(frozen=True)
class SwitchLoRASwitch(events.Periodic):
  """Every ``every`` steps, switch random B rows and A columns of every SwitchLoRA layer.

  How many: ``count`` per event, or with ``interval`` set the official schedule
  (`scheduled_count`, see the module docstring; then ``count`` must be left at
  1). At most min(rank, pool size) per event. The Adam moments (every
  optimizer-state leaf) of exactly the switched B rows and A columns are
  zeroed; nothing else in the optimizer state changes.
  """

  every: int = 1
  count: int = 1
  interval: float | None = None
  descend_steps: int | None = None
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.count, int) or self.count < 1:
      raise ValueError(f"switchlora_switch: count must be an integer >= 1, got {self.count!r}.")
    if self.interval is not None and not self.interval > 0:
      raise ValueError(f"switchlora_switch: interval must be > 0 or None, got {self.interval!r}.")
    if self.interval is not None and self.count != 1:
      raise ValueError("switchlora_switch: give either count (a fixed number per event) or "
                       "interval (the official schedule), not both.")
    if self.descend_steps is not None and (not isinstance(self.descend_steps, int)
                                           or self.descend_steps < 1):
      raise ValueError(f"switchlora_switch: descend_steps must be an integer >= 1 or None, got "
                       f"{self.descend_steps!r}.")
    if self.descend_steps is not None and self.interval is None:
      raise ValueError("switchlora_switch: descend_steps needs interval (the official schedule).")

  def __call__(self, model, opt_state, step):
    key = self.step_key(self.seed, step)
    for i, (path, layer) in enumerate(events.modules_of_type(model, SwitchLoRA)):
      rank = layer.spec.rank
      pool = layer.spec.pool_size(layer.view.fan_in, layer.view.fan_out)
      keys = jax.random.split(jax.random.fold_in(key, i), 5)
      wanted = self.count if self.interval is None else scheduled_count(
          keys[4], rank, step, self.every, self.interval, self.descend_steps)
      count = min(wanted, rank, pool)
      if count == 0:
        continue
      rows = jax.random.choice(keys[0], rank, (count,), replace=False)
      layer.switch_b(rows, jax.random.choice(keys[1], pool, (count,), replace=False))
      cols = jax.random.choice(keys[2], rank, (count,), replace=False)
      layer.switch_a(cols, jax.random.choice(keys[3], pool, (count,), replace=False))
      opt_state = events.zero_param_state_slices(opt_state, path + ("lora_b",), layer.lora_b.shape,
                                                 rows, axis=0)
      opt_state = events.zero_param_state_slices(opt_state, path + ("lora_a",), layer.lora_a.shape,
                                                 cols, axis=1)
    return model, opt_state

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
``W0 <- W0 + s (a_i - c) b_i^T``.

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

Which vectors switch (official ``SwitchLoraLayer.switch`` and
``_select_indices``). With k the number of vectors per factor switched so far
(the layer's buffer ``switch_count``), an event switching n vectors takes

* the A columns ``p_A, ..., p_A + n - 1`` and the B rows ``p_B, ..., p_B + n -
  1`` (mod r), ``p_A = k mod r``, ``p_B = (k + floor(r / 2)) mod r``: both
  pointers walk cyclically, B's half a turn ahead, so ``a_i`` and ``b_i`` are
  never switched together;
* at most the official bound ``min((p_A - f_A - p_B) mod r, (p_B - f_B - p_A)
  mod r)`` (`switch_bound`), f_A and f_B the numbers of frozen A columns and B
  rows, which keeps the switched vectors off the frozen ones, and at most m;
* the candidates, with ``selection='cyclic'`` (the official default): the
  pool is a FIFO queue, the j-th switched vector takes pool entry ``(k + j)
  mod m`` and leaves its old value there. This is the official ring of
  ``min(fan_in, fan_out)`` slots, of which the r in-use ones form a window
  that advances one slot per switch: the slot entering the window is loaded,
  the slot leaving it takes back the trained vector. With
  ``selection='random'`` (official ``--discontinuous_switch``) the n
  candidates are distinct pool entries drawn uniformly; the indices still
  walk cyclically, as in the official code.

Counterpart freeze (official ``_switch_chosen_indices``,
``SwitchLoraLayer.zero_lora_states`` and ``correct_switched_lora``):
switching ``a_i`` freezes ``b_i``, and switching ``b_i`` freezes ``a_i``, for
``freeze_steps`` optimizer steps (official ``adam_warm_step`` = 5). The
counterpart's optimizer moments are zeroed at the switch and its gradient is
zero while it is frozen; the switched vector keeps its moments (its gradient,
e.g. ``s a_i^T x^T g`` for ``b_i``, does not involve ``b_i``). The official
code zeroes the gradient tensor before ``optimizer.step``; here the forward
multiplies by ``stop_gradient`` of the frozen vectors (counters ``freeze_a``
(r,) and ``freeze_b`` (r,), int buffers), so every optax optimizer receives
an exactly zero gradient for them with nothing to chain, and with zeroed
moments Adam, SGD with momentum and the like leave them unchanged (decoupled
weight decay still shrinks them, as the official AdamW does). The event
lowers the counters by ``every`` each time it runs.

Switching schedule (`SwitchLoRASwitch`): either a fixed ``count`` per event,
or the official schedule: with base ``interval`` (official 40) and
``descend_steps``, ``rank * rate(t) / interval`` vectors per step, stochastically
rounded, ``rate(t) = 0.3^((t + 1) / descend_steps)`` (the switch frequency
decays exponentially to 30% at ``descend_steps``; None keeps it constant).

Differences from the official code:

* optax keeps one step count per leaf; the official StepAdamW keeps one per
  A column and B row and resets it with the moments, so after a freeze it
  bias-corrects the counterpart as a fresh vector at step ``freeze_steps +
  1``. Here the global count (large late in training) is not reset: after
  the freeze Adam's first update of the counterpart is ``(1 - b1) / sqrt(1 -
  b2)`` (about 3.2 with the defaults) times the size of a bias-corrected one
  (the official one, at step 6, about 0.52 times);
* the official code switches at every step; with ``every > 1`` the freeze
  lasts ``freeze_steps`` rounded up to a multiple of ``every``;
* the official random selection may also draw the stale slots of the vectors
  being replaced; here it draws from the m pool entries only;
* rank 1 never switches in the official code (its bound is always 0); here
  the event raises;
* candidate dropping (official ``switch_lora_drop``, default 0) and CPU
  offloading of the pools are not implemented.
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

SELECTIONS = ("cyclic", "random")


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
  """LoRA plus frozen candidate pools and the switching state (see the module docstring).

  Buffers: ``candidates_a`` (fan_in, m), ``candidates_b`` (m, fan_out);
  ``switch_count`` (int scalar), the vectors per factor switched so far;
  ``freeze_a``, ``freeze_b`` (r,) ints, the optimizer steps for which each
  ``a_i`` / ``b_i`` stays frozen.
  """

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
    self.switch_count = adapter_base.AdapterBuffer(jnp.zeros((), jnp.int32))
    self.freeze_a = adapter_base.AdapterBuffer(jnp.zeros((r,), jnp.int32))
    self.freeze_b = adapter_base.AdapterBuffer(jnp.zeros((r,), jnp.int32))

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """A and B with the gradient of the frozen vectors stopped (values unchanged)."""
    a, b = self.lora_a[...], self.lora_b[...]
    frozen_a = self.freeze_a[...] > 0
    frozen_b = (self.freeze_b[...] > 0)[:, None]
    return (jnp.where(frozen_a, jax.lax.stop_gradient(a), a),
            jnp.where(frozen_b, jax.lax.stop_gradient(b), b))

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

  def switch_next(self, count: int, picks_a: jax.Array, picks_b: jax.Array,
                  freeze_steps: int) -> tuple[jax.Array, jax.Array]:
    """Switch the next ``count`` A columns and B rows (`pointers`) to the given pool entries.

    Freezes the counterparts (b_i of a switched a_i and vice versa) for
    ``freeze_steps`` steps and advances ``switch_count``. Returns the switched
    A columns and B rows.
    """
    rank, k = self.spec.rank, int(self.switch_count[...])
    p_a, p_b = pointers(k, rank)
    cols = (p_a + jnp.arange(count)) % rank
    rows = (p_b + jnp.arange(count)) % rank
    self.switch_a(cols, picks_a)
    self.switch_b(rows, picks_b)
    self.freeze_b[...] = self.freeze_b[...].at[cols].set(freeze_steps)
    self.freeze_a[...] = self.freeze_a[...].at[rows].set(freeze_steps)
    self.switch_count[...] = jnp.asarray(k + count, jnp.int32)
    return cols, rows

  def release(self, steps: int) -> None:
    """Count ``steps`` optimizer steps off the freeze counters."""
    self.freeze_a[...] = jnp.maximum(self.freeze_a[...] - steps, 0)
    self.freeze_b[...] = jnp.maximum(self.freeze_b[...] - steps, 0)


def pointers(switch_count: int, rank: int) -> tuple[int, int]:
  """(p_A, p_B), the next A column and B row to switch (official candidate_A/B_index)."""
  return switch_count % rank, (switch_count + rank // 2) % rank


def switch_bound(switch_count: int, rank: int, frozen_a: int, frozen_b: int) -> int:
  """The official bound on the vectors per factor that may switch now (``SwitchLoraLayer.switch``).

  ``min((p_A - f_A - p_B) mod r, (p_B - f_B - p_A) mod r)`` with ``f_A``,
  ``f_B`` the numbers of frozen A columns and B rows: the switched indices stay
  off the frozen vectors and off each other.
  """
  p_a, p_b = pointers(switch_count, rank)
  return min((p_a - frozen_a - p_b) % rank, (p_b - frozen_b - p_a) % rank)


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
  """Every ``every`` steps, switch the next A columns and B rows of every SwitchLoRA layer.

  How many: ``count`` per event, or with ``interval`` set the official schedule
  (`scheduled_count`, see the module docstring; then ``count`` must be left at
  1), at most `switch_bound` and the pool size. Indices walk cyclically;
  ``selection`` picks the candidates ('cyclic': the official default, the pool
  as a FIFO queue; 'random': uniform without replacement). The counterpart of
  each switched vector is frozen for ``freeze_steps`` optimizer steps (rounded
  up to a multiple of ``every``) and its optimizer moments (every
  optimizer-state leaf of its shape) are zeroed; nothing else in the
  optimizer state changes. After ``stop`` the event keeps running, without
  switching, until the last freezes are over.
  """

  every: int = 1
  count: int = 1
  interval: float | None = None
  descend_steps: int | None = None
  selection: str = "cyclic"
  freeze_steps: int = 5
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
    if self.selection not in SELECTIONS:
      raise ValueError(f"switchlora_switch: selection must be one of {SELECTIONS}, got "
                       f"{self.selection!r}.")
    if (not isinstance(self.freeze_steps, int) or isinstance(self.freeze_steps, bool)
        or self.freeze_steps < 0):
      raise ValueError(f"switchlora_switch: freeze_steps must be an integer >= 0, got "
                       f"{self.freeze_steps!r}.")
    if self.interval is not None and self.interval < 2 * self.freeze_steps:
      raise ValueError(f"switchlora_switch: interval={self.interval!r} is below 2 * freeze_steps = "
                       f"{2 * self.freeze_steps} (the official code refuses a switch interval "
                       "shorter than twice the freeze).")

  @property
  def freeze_window(self) -> int:
    """Steps a counterpart stays frozen: ``freeze_steps`` rounded up to a multiple of ``every``."""
    return self.every * math.ceil(self.freeze_steps / self.every)

  def due(self, step: int) -> bool:
    last = None if self.stop is None else self.stop + self.freeze_window
    return step % self.every == 0 and (last is None or step <= last)

  def __call__(self, model, opt_state, step):
    key = self.step_key(self.seed, step)
    for i, (path, layer) in enumerate(events.modules_of_type(model, SwitchLoRA)):
      rank = layer.spec.rank
      if rank < 2:
        raise ValueError(f"switchlora_switch at '{layer.path}': rank={rank} cannot switch; the "
                         "official rule never switches a_i and b_i together, so it needs rank >= 2.")
      layer.release(self.every)
      if self.stop is not None and step > self.stop:
        continue
      pool = layer.spec.pool_size(layer.view.fan_in, layer.view.fan_out)
      keys = jax.random.split(jax.random.fold_in(key, i), 3)
      wanted = self.count if self.interval is None else scheduled_count(
          keys[0], rank, step, self.every, self.interval, self.descend_steps)
      switched = int(layer.switch_count[...])
      frozen_a, frozen_b = int(jnp.sum(layer.freeze_a[...] > 0)), int(jnp.sum(layer.freeze_b[...] > 0))
      count = min(wanted, pool, switch_bound(switched, rank, frozen_a, frozen_b))
      if count <= 0:
        continue
      if self.selection == "cyclic":
        picks_a = picks_b = (switched + jnp.arange(count)) % pool
      else:
        picks_a = jax.random.choice(keys[1], pool, (count,), replace=False)
        picks_b = jax.random.choice(keys[2], pool, (count,), replace=False)
      cols, rows = layer.switch_next(count, picks_a, picks_b, self.freeze_steps)
      # The counterparts' moments: b_i of each switched a_i, a_i of each switched b_i.
      opt_state = events.zero_param_state_slices(opt_state, path + ("lora_b",), layer.lora_b.shape,
                                                 cols, axis=0)
      opt_state = events.zero_param_state_slices(opt_state, path + ("lora_a",), layer.lora_a.shape,
                                                 rows, axis=1)
    return model, opt_state

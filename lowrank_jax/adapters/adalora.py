"""AdaLoRA: SVD-form updates whose singular values are pruned to a global budget.

"AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(2023):

    W = W0 + s P diag(lambda) Q,    P (out, r), Q (r, in)

In our layout ``a = Q^T`` (fan_in, r), ``core = lambda`` (r,), ``b = P^T``
(r, fan_out): the three-factor adapter with a diagonal core, all factors
trained and ``lambda = 0``. PEFT draws ``P, Q ~ N(0, 0.02^2)``; our default
``factor_std=None`` draws ``Q^T ~ N(0, 1/fan_in)`` and ``P^T ~ N(0, 1/fan_out)``,
near-orthonormal columns where the orthogonality penalty is small (with 0.02
the update stays ~1e-3 of LoRA's for many steps); ``factor_std=0.02`` is PEFT's. The loss adds
``gamma * regularizers.adalora_orthogonality(model)``.

`BudgetAllocator` is the training-step event that prunes singular values:
every step it smooths the sensitivity ``I = |w * dL/dw|`` of every entry of
P, lambda, Q (``Ibar <- b1 Ibar + (1 - b1) I``, ``Ubar <- b2 Ubar +
(1 - b2) |I - Ibar|``, score ``Ibar * Ubar``), scores triplet i by
``S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` and, every
``delta_t`` steps, zeroes the lambdas whose score is among the lowest
``initial - budget(t)`` across all adapters. The budget follows PEFT's
schedule: the initial total rank during ``tinit`` warmup steps, a cubic
decay ``target + (initial - target) (1 - (t - tinit) / (T - tfinal - tinit))^3``
(floored to an integer), then the target (``target_rank`` per adapter) for
the last ``tfinal`` steps, when the final pattern is applied after every
step. A zeroed lambda keeps its gradient and can revive before the final
phase, as in PEFT.

Differences from PEFT: none in the schedule, scores and masking (tested
numerically against ``peft.tuners.adalora.RankAllocator``); PEFT's
``kthvalue`` with k = 0 (budget equal to the initial one) raises, ours
masks nothing. The scale is ``alpha / r`` with the initial r, like PEFT's
``lora_alpha / ranknum``.

Each adapter keeps the allocator's latest pattern in ``rank_mask`` (an
`AdapterBuffer` of 0/1 per triplet, all ones until the first masking), PEFT's
``rank_pattern``: the forward does not read it (the pruned lambdas are zeros),
the PEFT export writes only the kept triplets and the pattern
(`lowrank_jax.io.peft_methods`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters.factored import Factored
from lowrank_jax.adapters.factored import FactoredSpec

Array = jax.Array


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class AdaLoRASpec(FactoredSpec):
  """AdaLoRA hyperparameters (module docstring); ``rank`` is the initial rank."""

  name = "adalora"
  rank: int | None = 6
  init: str = "gaussian"
  factor_std: float | None = None
  core: str = "diagonal"
  train: tuple[str, ...] = ("a", "core", "b")

  def build(self, base, *, rngs, calibration=None, path=""):
    adapter = super().build(base, rngs=rngs, calibration=calibration, path=path)
    core = adapter.core[...]
    adapter.rank_mask = adapter_base.AdapterBuffer(jnp.ones(core.shape, core.dtype))
    return adapter


def adalora_sites(model: nnx.Module) -> list[tuple[str, Factored]]:
  """(path, adapter) of the AdaLoRA adapters of ``model``."""
  from lowrank_jax.attach import adapters as list_adapters  # attach imports this package
  return [(p, m) for p, m in list_adapters(model)
          if isinstance(m, Factored) and isinstance(m.spec, AdaLoRASpec)]


def _grads_by_site(grads: Any) -> dict[str, dict[str, Array]]:
  """{adapter path: {leaf name: gradient}} from an nnx.State of adapter gradients."""
  out: dict[str, dict[str, Array]] = {}
  for path, value in nnx.to_flat_state(grads):
    value = value[...] if isinstance(value, nnx.Variable) else value
    out.setdefault("/".join(str(p) for p in path[:-1]), {})[str(path[-1])] = value
  return out


class BudgetAllocator:
  """AdaLoRA's global budget scheduler (an `lowrank_jax.reparam.events.Event`).

  Usage, each step after computing ``grads`` of the AdaLoRA parameters
  (``nnx.grad(..., argnums=nnx.DiffState(0, lrj.AdapterParam))``) and the
  optimizer update::

      allocator.observe(grads)
      model, opt_state = allocator(model, opt_state, step)   # step is 1-based

  Args:
    model: the model with AdaLoRA adapters (their initial ranks set the
      initial budget).
    target_rank: average final rank per adapter.
    total_step: T, the number of training steps.
    tinit, tfinal: warmup and final steps (PEFT's names).
    delta_t: steps between two maskings during the decay.
    beta1, beta2: EMA factors of the sensitivity and its uncertainty.
  """

  def __init__(self, model: nnx.Module, *, target_rank: int, total_step: int, tinit: int = 0,
               tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85):
    sites = adalora_sites(model)
    if not sites:
      raise ValueError("BudgetAllocator: the model has no AdaLoRA adapters.")
    if not 0 < beta1 < 1 or not 0 < beta2 < 1:
      raise ValueError(f"BudgetAllocator: beta1, beta2 must be in (0, 1), got {beta1}, {beta2}.")
    if tinit >= total_step - tfinal:
      raise ValueError(f"BudgetAllocator: tinit={tinit} must be < total_step - tfinal = "
                       f"{total_step - tfinal}, or there is no budgeting phase.")
    if delta_t < 1:
      raise ValueError(f"BudgetAllocator: delta_t must be >= 1, got {delta_t}.")
    self.paths = [p for p, _ in sites]
    self.initial_budget = sum(int(m.core.shape[0]) for _, m in sites)
    self.target_budget = target_rank * len(sites)
    if not 0 < self.target_budget <= self.initial_budget:
      raise ValueError(f"BudgetAllocator: target_rank={target_rank} per adapter gives a budget "
                       f"{self.target_budget} outside (0, initial total rank "
                       f"{self.initial_budget}].")
    self.total_step, self.tinit, self.tfinal, self.delta_t = total_step, tinit, tfinal, delta_t
    self.beta1, self.beta2 = beta1, beta2
    self.rank_pattern: dict[str, Array] | None = None
    self._grads: dict[str, dict[str, Array]] | None = None
    self.reset_importance()

  def reset_importance(self) -> None:
    self.exp_avg_ipt: dict[str, dict[str, Array]] = {}
    self.exp_avg_unc: dict[str, dict[str, Array]] = {}

  # -- schedule -------------------------------------------------------------------
  def budget_schedule(self, step: int) -> tuple[int, bool]:
    """(budget, whether to mask at this step), PEFT's ``RankAllocator.budget_schedule``."""
    if step <= self.tinit:
      return self.initial_budget, False
    if step > self.total_step - self.tfinal:
      return self.target_budget, True
    progress = 1.0 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
    budget = int((self.initial_budget - self.target_budget) * progress ** 3 + self.target_budget)
    return budget, step % self.delta_t == 0

  def due(self, step: int) -> bool:
    return True

  # -- sensitivity -------------------------------------------------------------------
  def observe(self, grads: Any) -> None:
    """Hand over this step's gradients of the adapter parameters (an nnx.State)."""
    self._grads = _grads_by_site(grads)

  def _update_importance(self, model: nnx.Module) -> None:
    if self._grads is None:
      raise ValueError("BudgetAllocator: call observe(grads) before the event at each step.")
    for path, adapter in adalora_sites(model):
      if path not in self._grads:
        raise ValueError(f"BudgetAllocator: the gradients have no entry for adapter '{path}'.")
      ipt_avg = self.exp_avg_ipt.setdefault(path, {})
      unc_avg = self.exp_avg_unc.setdefault(path, {})
      for leaf in ("a", "core", "b"):
        w = getattr(adapter, leaf)[...].astype(jnp.float32)
        ipt = jnp.abs(w * self._grads[path][leaf].astype(jnp.float32))
        avg = self.beta1 * ipt_avg.get(leaf, jnp.zeros_like(w)) + (1 - self.beta1) * ipt
        unc = self.beta2 * unc_avg.get(leaf, jnp.zeros_like(w)) + (1 - self.beta2) * jnp.abs(ipt - avg)
        ipt_avg[leaf], unc_avg[leaf] = avg, unc
    self._grads = None

  def triplet_scores(self) -> dict[str, Array]:
    """S_i per adapter: s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ibar * Ubar."""
    scores = {}
    for path in self.paths:
      s = {leaf: self.exp_avg_ipt[path][leaf] * self.exp_avg_unc[path][leaf]
           for leaf in ("a", "core", "b")}
      scores[path] = s["core"] + jnp.mean(s["a"], axis=0) + jnp.mean(s["b"], axis=1)
    return scores

  def _mask_to_budget(self, model: nnx.Module, budget: int) -> dict[str, Array]:
    scores = self.triplet_scores()
    all_scores = np.concatenate([np.asarray(scores[p]) for p in self.paths])
    n_masked = self.initial_budget - budget
    threshold = np.sort(all_scores)[n_masked - 1] if n_masked > 0 else -np.inf
    pattern = {p: jnp.asarray(np.asarray(scores[p]) > threshold) for p in self.paths}
    self._apply_pattern(model, pattern)
    return pattern

  @staticmethod
  def _apply_pattern(model: nnx.Module, pattern: dict[str, Array]) -> None:
    for path, adapter in adalora_sites(model):
      core = adapter.core[...]
      adapter.core[...] = jnp.where(pattern[path], core, jnp.zeros_like(core))
      adapter.rank_mask[...] = jnp.asarray(pattern[path], core.dtype)

  def ranks(self, model: nnx.Module) -> dict[str, int]:
    """Current rank (number of nonzero lambda) of every AdaLoRA adapter."""
    return {p: int(jnp.sum(m.core[...] != 0)) for p, m in adalora_sites(model)}

  # -- the event -------------------------------------------------------------------
  def __call__(self, model: nnx.Module, opt_state: Any, step: int) -> tuple[nnx.Module, Any]:
    final_start = self.total_step - self.tfinal
    if step < final_start:
      self._update_importance(model)
      budget, mask_now = self.budget_schedule(step)
      if mask_now:
        self.rank_pattern = self._mask_to_budget(model, budget)
    elif step == final_start:
      self._grads = None
      self.rank_pattern = self._mask_to_budget(model, self.budget_schedule(step)[0])
      self.reset_importance()
    else:
      self._grads = None
      if self.rank_pattern is not None:
        self._apply_pattern(model, self.rank_pattern)
    return model, opt_state

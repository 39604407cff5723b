"""AdaLoRA: the adapter, its regularizer and the budget allocator, against PEFT's RankAllocator."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft.tuners.adalora.layer import RankAllocator
from peft.tuners.adalora.model import AdaLoraModel

import lowrank_jax as lrj
from lowrank_jax.adapters import regularizers
from lowrank_jax.adapters.adalora import BudgetAllocator

SHAPES = [(10, 7), (8, 9), (6, 6)]  # (fan_in, fan_out) of the adapted layers
RANK = 5


def _w(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(seed=0, **hp):
  layers = {f"l{i}": nnx.Linear(i_, o, rngs=nnx.Rngs(seed + i)) for i, (i_, o) in enumerate(SHAPES)}
  model = nnx.Dict(**layers)
  lrj.attach(model, [(r"l\d", lrj.adapters.adalora(rank=RANK, **hp))], rngs=nnx.Rngs(seed))
  return model


def _set_random(model, seed):
  """Random factors and singular values (the trained state the allocator sees)."""
  for i, name in enumerate(sorted(model.keys())):
    adapter = model[name]
    for j, leaf in enumerate(("a", "core", "b")):
      v = getattr(adapter, leaf)
      v[...] = jnp.asarray(_w(v.shape, seed + 10 * i + j))


def _random_grads(model, seed):
  grads = nnx.state(model, lrj.AdapterParam)
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  new = [jnp.asarray(_w(l.shape, seed + k)) for k, l in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


class _PeftLayer(torch.nn.Module):
  def __init__(self, adapter):
    super().__init__()
    # PEFT: lora_A (r, in) = a^T, lora_E (r, 1) = lambda, lora_B (out, r) = b^T.
    t = lambda v: torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor(np.asarray(v)))})
    self.lora_A = t(np.asarray(adapter.a[...]).T)
    self.lora_E = t(np.asarray(adapter.core[...])[:, None])
    self.lora_B = t(np.asarray(adapter.b[...]).T)


def _peft_twin(model, config):
  torch_model = torch.nn.Module()
  for name in sorted(model.keys()):
    torch_model.add_module(name, _PeftLayer(model[name]))
  allocator = RankAllocator(torch_model, config, "default")
  # AdaLoraModel.update_and_allocate only reads these attributes of self.
  owner = types.SimpleNamespace(peft_config={"default": config}, trainable_adapter_name="default",
                                rankallocator=allocator, model=torch_model)
  return torch_model, allocator, owner


def _set_peft_grads(torch_model, grads):
  flat = {tuple(str(k) for k in p): v[...] for p, v in nnx.to_flat_state(grads)}
  for name, layer in torch_model.named_children():
    layer.lora_A["default"].grad = torch.tensor(np.asarray(flat[(name, "a")]).T.copy())
    layer.lora_E["default"].grad = torch.tensor(np.asarray(flat[(name, "core")])[:, None].copy())
    layer.lora_B["default"].grad = torch.tensor(np.asarray(flat[(name, "b")]).T.copy())


CONFIG = dict(target_r=2, init_r=RANK, tinit=2, tfinal=3, deltaT=2, beta1=0.85, beta2=0.7,
              total_step=14)


def _allocator(model):
  c = CONFIG
  return BudgetAllocator(model, target_rank=c["target_r"], total_step=c["total_step"],
                         tinit=c["tinit"], tfinal=c["tfinal"], delta_t=c["deltaT"],
                         beta1=c["beta1"], beta2=c["beta2"])


def test_budget_schedule_matches_peft():
  model = _model()
  ours = _allocator(model)
  _, theirs, _ = _peft_twin(model, types.SimpleNamespace(**CONFIG))
  assert ours.initial_budget == theirs.init_bgt == RANK * len(SHAPES)
  assert ours.target_budget == theirs.target_bgt
  for step in range(1, CONFIG["total_step"] + 1):
    assert ours.budget_schedule(step) == theirs.budget_schedule(step), step


def test_pruning_matches_peft_and_reaches_the_budget_on_schedule():
  model = _model()
  _set_random(model, seed=1)
  ours = _allocator(model)
  torch_model, _, owner = _peft_twin(model, types.SimpleNamespace(**CONFIG))
  final_start = CONFIG["total_step"] - CONFIG["tfinal"]
  for step in range(1, CONFIG["total_step"] + 1):
    grads = _random_grads(model, seed=100 * step)
    _set_peft_grads(torch_model, grads)
    ours.observe(grads)
    ours(model, None, step)
    with torch.no_grad():
      AdaLoraModel.update_and_allocate(owner, step)
    for name, layer in torch_model.named_children():
      np.testing.assert_allclose(model[name].core[...], layer.lora_E["default"][:, 0].detach().numpy(),
                                 rtol=1e-6, err_msg=f"step {step}, {name}")
    budget, masked_now = ours.budget_schedule(step)
    ranks = ours.ranks(model)
    if masked_now or step >= final_start:
      assert sum(ranks.values()) == (budget if step < final_start else ours.target_budget), step
    # The optimizer would move the lambdas; in the final phase the pattern must hold.
    for name in model.keys():
      lam = model[name].core
      lam[...] = lam[...] + 0.01
      torch_model.get_submodule(name).lora_E["default"].data += 0.01
  ours(model, None, CONFIG["total_step"])  # the final phase masks again after every step
  ranks = ours.ranks(model)
  assert sum(ranks.values()) == CONFIG["target_r"] * len(SHAPES)
  assert ours.rank_pattern is not None


def test_final_pattern_is_reapplied_after_every_step():
  model = _model()
  _set_random(model, seed=2)
  ours = _allocator(model)
  for step in range(1, CONFIG["total_step"] + 1):
    ours.observe(_random_grads(model, seed=step))
    ours(model, None, step)
    for name in model.keys():
      model[name].core[...] = model[name].core[...] + 1.0  # revive everything
  ours(model, None, CONFIG["total_step"])
  assert sum(ours.ranks(model).values()) == ours.target_budget


def test_importance_is_the_peft_ema_of_weight_times_gradient():
  model = _model()
  _set_random(model, seed=3)
  ours = _allocator(model)
  w = np.asarray(model["l0"].core[...])
  g1, g2 = _random_grads(model, 7), _random_grads(model, 8)
  ours.observe(g1)
  ours(model, None, 1)
  ours.observe(g2)
  ours(model, None, 2)
  i1, i2 = np.abs(w * np.asarray(g1["l0"]["core"][...])), np.abs(w * np.asarray(g2["l0"]["core"][...]))
  b1, b2 = CONFIG["beta1"], CONFIG["beta2"]
  avg1 = (1 - b1) * i1
  unc1 = (1 - b2) * np.abs(i1 - avg1)
  avg2 = b1 * avg1 + (1 - b1) * i2
  unc2 = b2 * unc1 + (1 - b2) * np.abs(i2 - avg2)
  np.testing.assert_allclose(ours.exp_avg_ipt["l0"]["core"], avg2, rtol=1e-5)
  np.testing.assert_allclose(ours.exp_avg_unc["l0"]["core"], unc2, rtol=1e-5)


def test_allocator_errors():
  model = _model()
  ours = _allocator(model)
  with pytest.raises(ValueError, match="call observe"):
    ours(model, None, 1)
  with pytest.raises(ValueError, match="target_rank=9 per adapter"):
    BudgetAllocator(model, target_rank=9, total_step=10)
  with pytest.raises(ValueError, match="no budgeting phase"):
    BudgetAllocator(model, target_rank=2, total_step=10, tinit=5, tfinal=5)
  with pytest.raises(ValueError, match="no AdaLoRA adapters"):
    BudgetAllocator(nnx.Dict(l=nnx.Linear(3, 3, rngs=nnx.Rngs(0))), target_rank=1, total_step=3)


def test_adapter_starts_at_the_base_and_matches_peft_forward():
  model = _model(alpha=10.0)
  x = _w((3, SHAPES[0][0]), 4)
  adapter = model["l0"]
  np.testing.assert_allclose(adapter(jnp.asarray(x)), adapter.base(jnp.asarray(x)), atol=1e-6)
  _set_random(model, seed=5)
  a, lam, b = (np.asarray(getattr(adapter, k)[...]) for k in ("a", "core", "b"))
  # PEFT: (x @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5) with scaling = alpha, ranknum = r.
  layer = _PeftLayer(adapter)
  peft_delta = (torch.tensor(x) @ (layer.lora_A["default"] * layer.lora_E["default"]).T
                @ layer.lora_B["default"].T) * 10.0 / (RANK + 1e-5)
  y = np.asarray(adapter(jnp.asarray(x))) - np.asarray(adapter.base(jnp.asarray(x)))
  np.testing.assert_allclose(y, peft_delta.detach().numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(adapter.delta_matrix(), 2.0 * (a * lam) @ b, rtol=1e-5)


def test_orthogonality_penalty_matches_peft():
  model = _model()
  _set_random(model, seed=6)
  expected, count = 0.0, 0
  for name in model.keys():
    layer = _PeftLayer(model[name])
    for p, cov in ((layer.lora_A["default"], lambda p: p @ p.T),
                   (layer.lora_B["default"], lambda p: p.T @ p)):
      c = cov(p.detach())
      expected += float(torch.norm(c - torch.eye(*c.shape), p="fro"))
      count += 1
  np.testing.assert_allclose(regularizers.adalora_orthogonality(model), expected / count, rtol=1e-5)

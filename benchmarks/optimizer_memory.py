"""Optimizer-state bytes of a GPT (d=768, 12 layers) under each optimizer, against closed forms.

    python -m benchmarks.optimizer_memory [--quick] [--dion_rank=0.25]

The model (`lowrank_jax.models.gpt`, LLaMA layout: vocab 50257, SwiGLU width
2048, untied head) and each optimizer's state are built with
``jax.eval_shape``: shapes only, nothing is allocated, so the figures do not
depend on the machine. Each optimizer's bytes (the sum of size x itemsize over
the leaves of its state) must equal its closed-form formula, written from the
method's definition; the script fails if one does not. Writes
benchmarks/results/optimizer_memory.json with the ratio to AdamW.

Parameters are float32 (4 bytes); P_mat is the number of entries of the 2-D
kernels (embedding and head included: every parameter of this GPT is a
matrix except the RMSNorm scales, P_vec); int32 step counters are 4 bytes.
Optimizers whose module is absent from this checkout (the projected family)
are listed as unavailable.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags
from flax import nnx

from lowrank_jax.models import gpt
from lowrank_jax.optim import orthogonal
import lowrank_jax.optim as lo

_QUICK = flags.DEFINE_bool("quick", False, "A small GPT (d=128, 2 layers, vocab 256).")
_DION_RANK = flags.DEFINE_float("dion_rank", 0.25, "Dion's rank as a fraction of min(m, n).")
_GALORE_RANK = flags.DEFINE_integer("galore_rank", 128, "Rank of GaLore, FRUGAL and Flora.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/optimizer_memory.json", "JSON output path.")

F32, I32 = 4, 4


def gpt_config(quick: bool) -> gpt.GPTConfig:
  if quick:
    return gpt.GPTConfig(vocab_size=256, dim=128, depth=2, heads=4, mlp_dim=344, max_len=128)
  return gpt.GPTConfig(vocab_size=50257, dim=768, depth=12, heads=12, mlp_dim=2048, max_len=1024)


def abstract_params(config: gpt.GPTConfig):
  """The GPT's parameters as a tree of ShapeDtypeStructs (no allocation)."""
  model = nnx.eval_shape(lambda: gpt.GPT(config, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param).to_pure_dict()


def state_bytes(tx: optax.GradientTransformation, params) -> int:
  state = jax.eval_shape(tx.init, params)
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def _matrices(params):
  return [x.shape for x in jax.tree.leaves(params) if len(x.shape) == 2]


def _vector_entries(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params) if len(x.shape) != 2)


def adafactor_formula(params) -> int:
  """optax.adafactor: factored (rows + cols, plus a 1-entry placeholder) when the
  second-largest dim is >= 128, else the full second moment plus 2 placeholders."""
  total = 0
  for x in jax.tree.leaves(params):
    dims = sorted(x.shape)
    if len(dims) >= 2 and dims[-2] >= 128:
      total += sum(x.shape) + 1
    else:
      total += math.prod(x.shape) + 2
  return F32 * total + I32


def formulas(params, dion_rank: float) -> dict[str, tuple[optax.GradientTransformation, int, str]]:
  """name -> (transform, closed-form bytes, formula in words)."""
  p_total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  p_mat = sum(m * n for m, n in _matrices(params))
  p_vec = _vector_entries(params)
  dion_q = sum(m * orthogonal.dion_rank((m, n), dion_rank) for m, n in _matrices(params))
  return {
      "adamw": (optax.adamw(1e-3), 2 * F32 * p_total + I32, "2 P (m, v) + count"),
      "adafactor": (optax.adafactor(1e-3), adafactor_formula(params),
                    "sum over factored matrices of (m + n + 1), others P + 2; + count"),
      "muon": (lo.muon(1e-3), F32 * p_mat + 2 * F32 * p_vec + 2 * I32,
               "P_mat (momentum) + 2 P_vec (AdamW on vectors) + 2 counts"),
      "dion": (lo.dion(1e-3, rank=dion_rank), F32 * (p_mat + dion_q) + 2 * F32 * p_vec + I32,
               f"P_mat (M) + sum fan_in * r (Q, r = ceil({dion_rank} min(m, n))) + 2 P_vec + count"),
  }


def projected_entries(params, rank: int):
  """GaLore / FRUGAL / Flora (rank r) when lowrank_jax.optim.projection is present:
  name -> (transform, the registry's closed-form bytes)."""
  names = ("galore", "frugal", "flora")
  available = [n for n in names if n in lo.names()]
  entries = {}
  for name in available:
    formula = lo.registry.entry(name).state_bytes
    entries[name] = (lo.get(name, learning_rate=1e-3, rank=rank),
                     formula(params, rank=rank) if formula is not None else None)
  return entries, [n for n in names if n not in available]


def main(argv):
  del argv
  config = gpt_config(_QUICK.value)
  params = abstract_params(config)
  p_total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  rows = {}
  for name, (tx, formula, words) in formulas(params, _DION_RANK.value).items():
    measured = state_bytes(tx, params)
    if measured != formula:
      raise AssertionError(f"{name}: state bytes {measured} != formula {formula} ({words}).")
    rows[name] = {"bytes": measured, "formula_bytes": formula, "formula": words}
  projected, missing = projected_entries(params, _GALORE_RANK.value)
  for name, (tx, formula) in projected.items():
    measured = state_bytes(tx, params)
    if formula is not None and measured != formula:
      raise AssertionError(f"{name}: state bytes {measured} != its registered formula {formula}.")
    rows[name] = {"bytes": measured, "formula_bytes": formula,
                  "formula": f"registry state_bytes (rank {_GALORE_RANK.value})"}
  adamw = rows["adamw"]["bytes"]
  print(f"GPT d={config.dim} depth={config.depth} vocab={config.vocab_size}: "
        f"{p_total:,} parameters ({4 * p_total / 2**20:.1f} MiB float32)")
  print(f"{'optimizer':<12}{'state MiB':>12}{'/ AdamW':>10}  formula")
  for name, row in rows.items():
    row["ratio_to_adamw"] = row["bytes"] / adamw
    print(f"{name:<12}{row['bytes'] / 2**20:>12.2f}{row['ratio_to_adamw']:>10.3f}  {row['formula']}")
  for name in missing:
    print(f"{name:<12}{'unavailable in this checkout':>22}")
  result = {"model": {"dim": config.dim, "depth": config.depth, "vocab_size": config.vocab_size,
                      "mlp_dim": config.mlp_dim, "parameters": p_total},
            "quick": _QUICK.value, "dion_rank": _DION_RANK.value, "optimizers": rows,
            "unavailable": missing}
  if not _QUICK.value:
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

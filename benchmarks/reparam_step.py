"""Training-step time and memory of reparameterized layers against the trainable dense layer.

    python -m benchmarks.reparam_step [--quick] [--tokens=4096] [--dims=1024,2048] [--methods=...]

For each width d: the dense step computes y = x W and the gradients for x and W (pretraining
trains W); each reparameterized layer's step computes its output and the gradients for x and for
its trainable leaves. Both jitted, float32, median of repeats timed in alternation in the same
run. Reported as ratios against the dense layer: step time, compiled temporary memory
(XLA's memory analysis of the jitted step; also printed in MiB, since the dense step may need
no temporaries beyond its inputs and outputs, as on XLA:CPU, leaving the ratio undefined), and
trainable parameters (Adam's state is twice that). ``--quick`` runs d=128 with few tokens and repeats, to check the script works. Writes
benchmarks/results/reparam_step.json (or reparam_step_quick.json).
"""

from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx

import lowrank_jax as lrj
from benchmarks.timing import median_seconds

_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes, to check that the script runs.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per step (rows of x).")
_DIMS = flags.DEFINE_list("dims", ["1024", "2048"], "Layer widths d (d x d kernels).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed repetitions (median reported).")
_OUT = flags.DEFINE_string("out", None, "JSON output path (default benchmarks/results/...).")
_METHODS = flags.DEFINE_list("methods", None, "Methods to time (default: all of specs()).")


def specs(d: int) -> dict[str, lrj.AdapterSpec]:
  """Reparameterizations timed at width d (ranks d/16, NOBLE d/32, POET-BS blocks d/8)."""
  rank, block = max(1, d // 16), max(2, d // 8)
  low_rank = dict(rank=rank, alpha=float(rank))
  return {
      "poet": lrj.adapters.poet(),
      "poet_block": lrj.adapters.poet(block_size=block),
      "sltrain": lrj.adapters.sltrain(rank=rank, sparsity=0.03),
      "lost": lrj.adapters.lost(rank=rank, sparsity=0.05),
      "sst": lrj.adapters.sst(rank=rank),
      "relora": lrj.adapters.relora(**low_rank),
      "switchlora": lrj.adapters.switchlora(**low_rank),
      "weight_norm": lrj.adapters.weight_norm(),
      "noble": lrj.adapters.noble(rank=max(1, d // 32)),
  }


def _layer(d: int, spec=None):
  host = nnx.Dict({"layer": nnx.Linear(d, d, use_bias=False, rngs=nnx.Rngs(0))})
  if spec is not None:
    lrj.attach(host, [("layer", spec)], rngs=nnx.Rngs(1))
  return host


def step_fn(host, wrt):
  graphdef, trained, rest = nnx.split(host, wrt, ...)

  @jax.jit
  def step(trained, x, cotangent):
    def forward(trained, x):
      return nnx.merge(graphdef, trained, rest)["layer"](x)
    y, vjp = jax.vjp(forward, trained, x)
    return y, vjp(cotangent)

  return step, trained


def temp_bytes(step, *args) -> int:
  analysis = step.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else -1


def size(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def main(argv):
  del argv
  quick = _QUICK.value
  dims = [128] if quick else list(map(int, _DIMS.value))
  tokens = 256 if quick else _TOKENS.value
  repeats = 3 if quick else _REPEATS.value
  rows = []
  for d in dims:
    x = jax.random.normal(jax.random.key(2), (tokens, d), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(3), (tokens, d), jnp.float32)
    dense_step, dense_params = step_fn(_layer(d), nnx.Param)
    dense_args = (dense_params, x, cotangent)
    dense_temp = temp_bytes(dense_step, *dense_args)
    table = specs(d)
    unknown = sorted(set(_METHODS.value or ()) - set(table))
    if unknown:
      raise ValueError(f"--methods: unknown {unknown}; known: {sorted(table)}.")
    for method, spec in table.items():
      if _METHODS.value and method not in _METHODS.value:
        continue
      step, trained = step_fn(_layer(d, spec), lrj.AdapterParam)
      args = (trained, x, cotangent)
      dense_s, seconds = median_seconds([(dense_step, dense_args), (step, args)], repeats)
      temp = temp_bytes(step, *args)
      rows.append(dict(method=method, d=d, dense_s=dense_s, step_s=seconds,
                       time_ratio=seconds / dense_s, dense_temp_bytes=dense_temp,
                       temp_bytes=temp, temp_ratio=temp / dense_temp if dense_temp > 0 else None,
                       trainable=size(trained), trainable_ratio=size(trained) / (d * d)))
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), tokens={tokens}, "
        f"float32, median of {repeats}")
  print(f"{'method':<12}{'d':>6}{'dense ms':>10}{'step ms':>10}{'time x':>8}{'temp x':>8}"
        f"{'temp MiB':>10}{'params x':>10}")
  for row in rows:
    temp = "n/a" if row["temp_ratio"] is None else f"{row['temp_ratio']:.2f}"
    print(f"{row['method']:<12}{row['d']:>6}{1e3 * row['dense_s']:>10.2f}"
          f"{1e3 * row['step_s']:>10.2f}{row['time_ratio']:>8.2f}{temp:>8}"
          f"{row['temp_bytes'] / 2**20:>10.1f}{row['trainable_ratio']:>10.3f}")
  out = _OUT.value or f"benchmarks/results/reparam_step{'_quick' if quick else ''}.json"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(device=str(jax.devices()[0]), backend=jax.default_backend(),
                   machine=platform.machine(), cpus=os.cpu_count(), tokens=tokens,
                   repeats=repeats, quick=quick, layers=rows), f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)

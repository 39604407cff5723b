"""Training step time of LoRA against full fine-tuning of the same GPT, in one run.

    python -m benchmarks.step_time [--dim=512] [--depth=4] [--seq_len=128] [--batch=8] [--rank=16]

Both use the training loop's jitted, buffer-donating step (experiments.loop)
with AdamW. LoRA (rank r) sits on every attention and MLP projection. Frozen
weights need no weight gradient, so the floor is about 2/3 of the full step.
Prints a table and writes benchmarks/results/step_time.json.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx

import lowrank_jax as lrj
from experiments import loop
from experiments import tasks
from lowrank_jax.models import gpt
from lowrank_jax.models import presets

_DIM = flags.DEFINE_integer("dim", 512, "Model width.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Blocks.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/step_time.json", "JSON output path.")


def time_method(method: str) -> dict:
  config = gpt.GPTConfig(vocab_size=256, dim=_DIM.value, depth=_DEPTH.value, heads=8,
                         mlp_dim=int(_DIM.value * 8 / 3) // 8 * 8, max_len=_SEQ.value + 1)
  model = gpt.GPT(config, rngs=nnx.Rngs(0))
  wrt = nnx.Param
  if method == "lora":
    lrj.attach(model, presets.rules("gpt", "all", lrj.adapters.lora(rank=_RANK.value)),
               rngs=nnx.Rngs(1))
    wrt = lrj.AdapterParam
  graphdef, trainable, rng_state, frozen = nnx.split(model, wrt, nnx.RngState, ...)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(trainable)
  train_step, _ = loop.make_steps(graphdef, graphdef, tasks.get("lm"), tx)
  tokens = np.random.default_rng(0).integers(0, 256, (_BATCH.value, _SEQ.value + 1), np.int32)
  batch = {"tokens": jnp.asarray(tokens)}
  first_bad = jnp.zeros((), jnp.int32)
  times = []
  for i in range(_REPEATS.value + 2):
    start = time.perf_counter()
    trainable, opt_state, rng_state, first_bad, metrics = train_step(
        trainable, opt_state, rng_state, first_bad, frozen, batch, jnp.int32(i + 1))
    jax.block_until_ready(metrics["loss"])
    if i >= 2:  # compile and warm-up
      times.append(time.perf_counter() - start)
  return dict(method=method, step_s=statistics.median(times),
              trainable_params=int(sum(x.size for x in jax.tree_util.tree_leaves(trainable))))


def main(argv):
  del argv
  full, lora = time_method("full"), time_method("lora")
  ratio = lora["step_s"] / full["step_s"]
  print(f"device: {jax.devices()[0].device_kind}; GPT dim={_DIM.value} depth={_DEPTH.value} "
        f"tokens/step={_BATCH.value * _SEQ.value}; median of {_REPEATS.value}")
  print(f"{'method':<8}{'step ms':>10}{'trainable':>14}")
  for row in (full, lora):
    print(f"{row['method']:<8}{1e3 * row['step_s']:>10.1f}{row['trainable_params']:>14,}")
  print(f"LoRA / full step time: {ratio:.3f} (target <= 0.75)")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(dict(device=str(jax.devices()[0]), dim=_DIM.value, depth=_DEPTH.value,
                   seq_len=_SEQ.value, batch=_BATCH.value, rank=_RANK.value,
                   repeats=_REPEATS.value, full=full, lora=lora, ratio=ratio), f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

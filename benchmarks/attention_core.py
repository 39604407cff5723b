"""Attention-core alternatives for the BERT encoder: forward and LoRA train-step time, one run.

    python -m benchmarks.attention_core [--batch=32] [--seq_len=128] [--repeats=5] [--quick]

Every alternative gets q, k, v as (batch, seq, heads, head_dim) and returns the same layout.
Two measurements, each timed in alternation across the alternatives:

* the core alone on (batch, seq, 12, 32) inputs with padding in the mask: forward, and forward
  + backward (gradients for q, k, v), ``core_repeats`` calls;
* the model (all-MiniLM-L6-v2 shape: 6 layers, hidden 384, 12 heads of 32, random weights),
  which calls `lowrank_jax.models.layers.attention`; each alternative replaces that function
  for its row, so projections, MLP and norms are identical. Timed: the jitted forward and the
  LoRA (r = 16 on query/key/value/attention output) AdamW train step, ``repeats`` calls. The
  forward of each alternative is compared with the model's own (max |difference| over the
  unpadded positions).

Both the median and the minimum are reported: on a machine shared with other jobs the minimum
is the better estimate of the uncontended time. Writes benchmarks/results/attention_core.json.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx

import lowrank_jax as lrj
from benchmarks import timing
from lowrank_jax.models import bert
from lowrank_jax.models import layers

_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed model calls.")
_CORE_REPEATS = flags.DEFINE_integer("core_repeats", 30, "Timed calls of the core alone.")
_MODEL_CORES = flags.DEFINE_list("model_cores", None,
                                 "Alternatives timed in the model (default: all).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny setting (batch 2 x 16 tokens, 1 repeat).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/attention_core.json", "JSON output path.")
TARGETS = r"encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense)"


def _masked(logits, mask):
  return logits if mask is None else jnp.where(mask, logits, jnp.finfo(logits.dtype).min)


def _manual_softmax(logits):
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def xla_dot_product_attention(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def einsum_bqhd(q, k, v, mask):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(_masked(logits, mask), axis=-1), v)


def _heads_first(q, k, v):
  return (jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))


def bhqd_matmul(q, k, v, mask):
  q, k, v = _heads_first(q, k, v)
  logits = (q @ jnp.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
  return jnp.swapaxes(jax.nn.softmax(_masked(logits, mask), axis=-1) @ v, 1, 2)


def bhqd_keys_transposed(q, k, v, mask):
  """k laid out (b, h, d, k) once, so the logits are a plain (q, d) @ (d, k) product."""
  kt = jnp.transpose(k, (0, 2, 3, 1))
  q, _, v = _heads_first(q, k, v)
  logits = (q @ kt) / math.sqrt(q.shape[-1])
  return jnp.swapaxes(jax.nn.softmax(_masked(logits, mask), axis=-1) @ v, 1, 2)


def bhqd_scaled_q_manual_softmax(q, k, v, mask):
  q, k, v = _heads_first(q / math.sqrt(q.shape[-1]), k, v)
  probs = _manual_softmax(_masked(q @ jnp.swapaxes(k, -1, -2), mask))
  return jnp.swapaxes(probs @ v, 1, 2)


def flat_batch_heads(q, k, v, mask):
  """(b*h, s, d) with one batch dimension."""
  b, s, h, d = q.shape
  flat = lambda t: jnp.swapaxes(t, 1, 2).reshape(b * h, s, d)
  logits = (flat(q) @ jnp.swapaxes(flat(k), -1, -2)).reshape(b, h, s, s) / math.sqrt(d)
  probs = jax.nn.softmax(_masked(logits, mask), axis=-1).reshape(b * h, s, s)
  return jnp.swapaxes((probs @ flat(v)).reshape(b, h, s, d), 1, 2)


def additive_mask_bias(q, k, v, mask):
  """HF's form: the mask as an additive (b, 1, 1, k) bias instead of a select."""
  q, k, v = _heads_first(q, k, v)
  logits = (q @ jnp.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = logits + jnp.where(mask, 0.0, jnp.finfo(logits.dtype).min)
  return jnp.swapaxes(jax.nn.softmax(logits, axis=-1) @ v, 1, 2)


ALTERNATIVES = {
    "model": None,  # lowrank_jax.models.layers.attention
    "dot_product_attention_xla": xla_dot_product_attention,
    "einsum_bqhd": einsum_bqhd,
    "bhqd_transposes": bhqd_matmul,
    "bhqd_keys_transposed": bhqd_keys_transposed,
    "bhqd_scaled_q_manual_softmax": bhqd_scaled_q_manual_softmax,
    "flat_batch_heads": flat_batch_heads,
    "bhqd_additive_mask": additive_mask_bias,
}


def _with_core(core, fn):
  """``fn`` traced with ``layers.attention`` replaced by ``core`` (None: the model's own)."""
  def wrapped(*args):
    original = layers.attention
    if core is not None:
      layers.attention = lambda q, k, v, *, mask=None, is_causal=False: core(q, k, v, mask)
    try:
      return fn(*args)
    finally:
      layers.attention = original
  return jax.jit(wrapped)


def _stats(times):
  return dict(median=statistics.median(times), min=min(times))


def _pair(stats, unit):
  return f"{stats['median'] * unit:.3f} / {stats['min'] * unit:.3f}"


def time_cores(q, k, v, mask, repeats):
  """{name: {'forward': stats, 'grad': stats}} of every core on its own."""
  cores = {name: core or (lambda q, k, v, mask: layers.attention(q, k, v, mask=mask))
           for name, core in ALTERNATIVES.items()}
  cotangent = jnp.ones_like(q)
  calls = []
  for core in cores.values():
    calls.append((jax.jit(core), (q, k, v, mask)))
    loss = lambda q, k, v, core=core: jnp.sum(core(q, k, v, mask) * cotangent)
    calls.append((jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v)))
  times = timing.alternating_seconds(calls, repeats)
  return {name: dict(forward=_stats(times[2 * i]), grad=_stats(times[2 * i + 1]))
          for i, name in enumerate(cores)}


def main(argv):
  del argv
  batch, seq, repeats, core_repeats = ((2, 16, 1, 1) if _QUICK.value else
                                       (_BATCH.value, _SEQ.value, _REPEATS.value,
                                        _CORE_REPEATS.value))
  model = bert.BertModel(bert.BertConfig(), rngs=nnx.Rngs(0))
  lrj.attach(model, [(TARGETS, lrj.adapters.lora(rank=16))], rngs=nnx.Rngs(1))
  graphdef, trainable, rest = nnx.split(model, lrj.AdapterParam, ...)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 30000, (batch, seq)), jnp.int32)
  lengths = rng.integers(seq // 2, seq + 1, batch)
  mask = jnp.asarray(np.arange(seq)[None, :] < lengths[:, None], jnp.int32)  # some padding
  qkv = jax.random.normal(jax.random.key(0), (3, batch, seq, 12, 32), jnp.float32)
  core_times = time_cores(*qkv, mask.astype(bool)[:, None, None, :], core_repeats)
  print(f"{jax.devices()[0]}; core alone, ({batch}, {seq}, 12, 32): ms, median / min of "
        f"{core_repeats}")
  print(f"{'attention core':<30}{'forward':>20}{'fwd + bwd':>20}")
  for name, t in core_times.items():
    print(f"{name:<30}{_pair(t['forward'], 1e3):>20}{_pair(t['grad'], 1e3):>20}")
  tx = optax.adamw(1e-4)
  opt_state = tx.init(trainable)

  def forward(trainable, rest, ids, mask):
    return nnx.merge(graphdef, trainable, rest)(ids, mask)

  def train_step(trainable, opt_state, rest, ids, mask):
    loss_fn = lambda t: jnp.mean(forward(t, rest, ids, mask) ** 2)
    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  names = _MODEL_CORES.value or list(ALTERNATIVES)
  unknown = sorted(set(names) - set(ALTERNATIVES))
  if unknown:
    raise ValueError(f"--model_cores: unknown {unknown}; known: {list(ALTERNATIVES)}.")
  names = ["model"] + [n for n in names if n != "model"]
  forwards = {name: _with_core(ALTERNATIVES[name], forward) for name in names}
  steps = {name: _with_core(ALTERNATIVES[name], train_step) for name in names}
  reference = np.asarray(forwards["model"](trainable, rest, ids, mask))
  valid = np.asarray(mask, bool)
  diffs = {name: float(np.max(np.abs(np.asarray(f(trainable, rest, ids, mask)) - reference)[valid]))
           for name, f in forwards.items()}
  fwd = timing.alternating_seconds(
      [(f, (trainable, rest, ids, mask)) for f in forwards.values()], repeats)
  step = timing.alternating_seconds(
      [(f, (trainable, opt_state, rest, ids, mask)) for f in steps.values()], repeats)
  rows = [dict(core=name, core_alone=core_times[name], model_forward=_stats(f),
               model_lora_step=_stats(s), max_abs_diff=diffs[name])
          for name, f, s in zip(names, fwd, step)]
  print(f"model, {batch}x{seq} tokens: seconds, median / min of {repeats}")
  print(f"{'attention core':<30}{'forward':>20}{'LoRA step':>20}{'max |diff|':>11}")
  for row in rows:
    print(f"{row['core']:<30}{_pair(row['model_forward'], 1):>20}"
          f"{_pair(row['model_lora_step'], 1):>20}{row['max_abs_diff']:>11.1e}")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(dict(batch=batch, seq_len=seq, repeats=repeats, core_repeats=core_repeats,
                   rows=rows, device=str(jax.devices()[0])), f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

"""Achieved TFLOP/s of the kernels and their time against a baseline in the same run.

    python -m benchmarks.kernels [--tokens=4096] [--dim=4096] [--ranks=16,64] [--groups=16]
        [--dtype=bfloat16] [--implementations=xla,pallas] [--quick]

Rows (each timed in alternation with its baseline, median of repeats):

* lora_matmul fwd+bwd (dx, dA, dB; frozen W0) against the dense ``x W0``
  forward + dx of the same shape. Target (GPU/TPU): ratio <= 1.10.
* grouped_lora fwd with ``--groups`` adapters (random ids per row) against
  the same call with one adapter. Target: ratio <= 1.25.
* newton_schulz (5 Muon steps on a dim x dim matrix) against the XLA version
  (pallas rows) or against linalg.newton_schulz (xla row). Target: pallas
  faster than XLA (ratio < 1).
* dora_norm against the XLA norm of the materialized ``W0 + s A B``.

The Pallas kernels are TPU-style; compiled they run on TPU only, so on other
backends the pallas rows are skipped with a note, except with ``--quick``,
which runs tiny shapes on any backend with the Pallas kernels in the
interpreter (interpreter times say nothing about speed: the mode proves the
script runs). Writes benchmarks/results/kernels.json (kernels_quick.json with
--quick).
"""

from __future__ import annotations

import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from benchmarks.timing import median_seconds
from lowrank_jax import linalg
from lowrank_jax.kernels import dora_norm
from lowrank_jax.kernels import grouped_lora
from lowrank_jax.kernels import lora_matmul
from lowrank_jax.kernels import newton_schulz

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Rows of x.")
_DIM = flags.DEFINE_integer("dim", 4096, "fan_in = fan_out = d; Newton-Schulz on d x d.")
_RANKS = flags.DEFINE_list("ranks", ["16", "64"], "LoRA ranks.")
_GROUPS = flags.DEFINE_integer("groups", 16, "Adapters in the grouped_lora bank.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Operand dtype.")
_IMPLS = flags.DEFINE_list("implementations", ["xla", "pallas"], "Kernel implementations.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repetitions (median).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes, Pallas interpreted, 2 repeats.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/kernels[_quick].json).")


def _normal(seed, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def lora_rows(tokens, d, rank, dtype, impls, interpret, repeats):
  x, g = _normal(0, (tokens, d), dtype), _normal(1, (tokens, d), dtype)
  w0 = _normal(2, (d, d), dtype, d**-0.5)
  a, b = _normal(3, (d, rank), dtype, d**-0.5), _normal(4, (rank, d), dtype)

  @jax.jit
  def dense(x, g):
    y, vjp = jax.vjp(lambda x: x @ w0, x)
    return y, vjp(g)

  def adapted(impl):
    fn = functools.partial(lora_matmul.lora_matmul, scale=2.0, implementation=impl,
                           interpret=interpret)
    return jax.jit(lambda x, a, b, g: (lambda out: (out[0], out[1](g)))(
        jax.vjp(lambda x, a, b: fn(x, w0, a, b), x, a, b)))

  calls = [(dense, (x, g))] + [(adapted(i), (x, a, b, g)) for i in impls]
  base, *times = median_seconds(calls, repeats)
  dense_flops = 2 * 2 * tokens * d * d
  flops = dense_flops + 2 * tokens * rank * (3 * d + 3 * d)
  return [dict(kernel="lora_matmul fwd+bwd", implementation=i, rank=rank, seconds=t,
               tflops=flops / t / 1e12, baseline="dense x W0 fwd+dx", baseline_seconds=base,
               baseline_tflops=dense_flops / base / 1e12, ratio=t / base)
          for i, t in zip(impls, times)]


def grouped_rows(tokens, d, rank, groups, dtype, impls, interpret, repeats):
  x = _normal(0, (tokens, d), dtype)
  w0 = _normal(2, (d, d), dtype, d**-0.5)
  a, b = _normal(3, (groups, d, rank), dtype, d**-0.5), _normal(4, (groups, rank, d), dtype)
  ids = jax.random.randint(jax.random.key(5), (tokens,), 0, groups)
  rows = []
  for impl in impls:
    fn = jax.jit(functools.partial(grouped_lora.grouped_lora, scales=2.0, implementation=impl,
                                   interpret=interpret))
    single, many = median_seconds([(fn, (x, w0, a[:1], b[:1], jnp.zeros_like(ids))),
                                   (fn, (x, w0, a, b, ids))], repeats)
    flops = 2 * tokens * d * d + 2 * tokens * rank * 2 * d  # useful flops (Punica's count)
    rows.append(dict(kernel=f"grouped_lora fwd, {groups} adapters", implementation=impl,
                     rank=rank, seconds=many, tflops=flops / many / 1e12,
                     baseline="same call, 1 adapter", baseline_seconds=single,
                     baseline_tflops=flops / single / 1e12, ratio=many / single))
  return rows


def newton_schulz_rows(d, dtype, impls, interpret, repeats):
  x = _normal(6, (d, d), dtype)
  steps = 5
  xla = jax.jit(functools.partial(newton_schulz.newton_schulz, steps=steps, implementation="xla"))
  reference = jax.jit(functools.partial(linalg.newton_schulz, steps=steps))
  flops = steps * (2 * d**3 + 2 * d**3 + 2 * d**3)  # dense count: X X^T, A A, B X
  rows = []
  for impl in impls:
    if impl == "xla":
      fn, base_fn, base_name = xla, reference, "linalg.newton_schulz (float32)"
    else:
      fn = jax.jit(functools.partial(newton_schulz.newton_schulz, steps=steps,
                                     implementation=impl, interpret=interpret))
      base_fn, base_name = xla, "newton_schulz xla"
    t, base = median_seconds([(fn, (x,)), (base_fn, (x,))], repeats)
    rows.append(dict(kernel=f"newton_schulz {steps} steps", implementation=impl, rank=None,
                     seconds=t, tflops=flops / t / 1e12, baseline=base_name,
                     baseline_seconds=base, baseline_tflops=flops / base / 1e12, ratio=t / base))
  return rows


def dora_norm_rows(d, rank, dtype, impls, interpret, repeats):
  w0 = _normal(2, (d, d), dtype, d**-0.5)
  a, b = _normal(3, (d, rank), dtype, d**-0.5), _normal(4, (rank, d), dtype)
  materialized = jax.jit(lambda w0, a, b: dora_norm.reference(w0, a, b, 2.0))
  flops = 2 * d * d * rank + 3 * d * d
  rows = []
  for impl in impls:
    fn = jax.jit(functools.partial(dora_norm.dora_norm, scale=2.0, implementation=impl,
                                   interpret=interpret))
    t, base = median_seconds([(fn, (w0, a, b)), (materialized, (w0, a, b))], repeats)
    rows.append(dict(kernel="dora_norm", implementation=impl, rank=rank, seconds=t,
                     tflops=flops / t / 1e12, baseline="norm of materialized W0 + sAB",
                     baseline_seconds=base, baseline_tflops=flops / base / 1e12,
                     ratio=t / base))
  return rows


def main(argv):
  del argv
  if _QUICK.value:
    tokens, d, ranks, groups, repeats = 64, 256, [8], 4, 2
    dtype = jnp.float32
  else:
    tokens, d, groups, repeats = _TOKENS.value, _DIM.value, _GROUPS.value, _REPEATS.value
    ranks, dtype = [int(r) for r in _RANKS.value], jnp.dtype(_DTYPE.value)
  backend = jax.default_backend()
  interpret = _QUICK.value
  impls, notes = [], []
  for impl in _IMPLS.value:
    if impl == "pallas" and backend != "tpu" and not interpret:
      notes.append(f"pallas skipped: the TPU-style kernels do not compile on {backend!r}")
    else:
      impls.append(impl)
  rows = []
  for rank in ranks:
    rows += lora_rows(tokens, d, rank, dtype, impls, interpret, repeats)
    rows += grouped_rows(tokens, d, rank, groups, dtype, impls, interpret, repeats)
    rows += dora_norm_rows(d, rank, dtype, impls, interpret, repeats)
  rows += newton_schulz_rows(d, dtype, impls, interpret, repeats)

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}), tokens={tokens}, d={d}, "
        f"dtype={jnp.dtype(dtype).name}, median of {repeats}"
        + (", Pallas INTERPRETED (--quick: times are not speeds)" if interpret else ""))
  for note in notes:
    print(note)
  header = f"{'kernel':<34}{'impl':<8}{'r':>4}{'ms':>10}{'TFLOP/s':>9}  {'baseline':<32}{'ms':>10}{'ratio':>7}"
  print(header)
  for r in rows:
    print(f"{r['kernel']:<34}{r['implementation']:<8}{str(r['rank'] or '-'):>4}"
          f"{1e3 * r['seconds']:>10.3f}{r['tflops']:>9.3f}  {r['baseline']:<32}"
          f"{1e3 * r['baseline_seconds']:>10.3f}{r['ratio']:>7.3f}")
  out = _OUT.value or f"benchmarks/results/kernels{'_quick' if _QUICK.value else ''}.json"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(device=str(device), device_kind=device.device_kind, backend=backend,
                   machine=platform.machine(), tokens=tokens, dim=d, groups=groups,
                   dtype=jnp.dtype(dtype).name, repeats=repeats, interpreted=interpret,
                   notes=notes, rows=rows), f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)

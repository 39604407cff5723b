"""Forward+backward time of adapted layers against the frozen dense layer.

    python -m benchmarks.adapter_overhead [--tokens=4096] [--dims=1024,2048] [--ranks=8,64]
        [--implementations=default,view] [--quick]

For each width d and rank r: the frozen dense layer's step computes y = x W0
and the gradient for x only (a frozen weight needs no weight gradient); the
adapted layer's step computes its output and the gradients for x and for the
adapter parameters. Both jitted, float32, median of repeats timed in
alternation in the same run; the table reports the ratio adapted / dense. Also times PiSSA's
randomized SVD init (pissa_niter_4) against the exact SVD init on a square
kernel. ``--implementations`` times the adapters' forward paths: 'default'
(``implementation=None``: the XLA kernel on this nnx.Linear), 'view' (the layer
view with autodiff, which the default takes on layers with a custom
contraction; forced here by an equal custom ``dot_general``), and the kernel
options 'xla', 'pallas', 'auto' (lowrank_jax/kernels/lora_matmul.py). ``--quick``: d = 1024, r = 8, 5 repeats, a
1024 x 1024 SVD. Writes benchmarks/results/adapter_overhead.json.
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
from lowrank_jax.adapters import init as lora_init

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per step (rows of x).")
_DIMS = flags.DEFINE_list("dims", ["1024", "2048"], "Layer widths d (d x d kernels).")
_RANKS = flags.DEFINE_list("ranks", ["8", "64"], "Adapter ranks.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed repetitions (median reported).")
_SVD_DIM = flags.DEFINE_integer("svd_dim", 4096, "Kernel size for the PiSSA init timing.")
_SVD_RANK = flags.DEFINE_integer("svd_rank", 16, "Rank for the PiSSA init timing.")
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations", ["default", "view"],
    "Forward paths: default, view, or an `implementation` value: xla, pallas, auto.")
_QUICK = flags.DEFINE_bool("quick", False, "Smallest setting: d=1024, r=8, 5 repeats.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/adapter_overhead.json", "JSON output path.")


def dense_step_fn(d: int):
  layer = nnx.Linear(d, d, use_bias=False, rngs=nnx.Rngs(0))
  kernel = layer.kernel[...]

  @jax.jit
  def step(x, cotangent):
    y, vjp = jax.vjp(lambda x: x @ kernel, x)
    return y, vjp(cotangent)[0]

  return step


def equal_dot_general(*args, **kwargs):
  """jax.lax.dot_general under another name: keeps an adapter on the layer-view path."""
  return jax.lax.dot_general(*args, **kwargs)


def adapted_step_fn(d: int, spec, view_path: bool = False):
  dot_general = equal_dot_general if view_path else jax.lax.dot_general
  host = nnx.Dict({"layer": nnx.Linear(d, d, use_bias=False, dot_general=dot_general,
                                       rngs=nnx.Rngs(0))})
  lrj.attach(host, [("layer", spec)], rngs=nnx.Rngs(1))
  graphdef, adapter_state, rest = nnx.split(host, lrj.AdapterParam, ...)

  @jax.jit
  def step(adapter_state, x, cotangent):
    def forward(adapter_state, x):
      return nnx.merge(graphdef, adapter_state, rest)["layer"](x)
    y, vjp = jax.vjp(forward, adapter_state, x)
    return y, vjp(cotangent)

  return step, adapter_state


def time_init(init: str, d: int, rank: int, repeats: int) -> float:
  w0 = jax.random.normal(jax.random.key(0), (d, d), jnp.float32) / d**0.5
  fn = jax.jit(lambda key, w: lora_init.lora_factors(init, key, w, rank, 1.0))
  return median_seconds([(fn, (jax.random.key(1), w0))], repeats)[0]


def main(argv):
  del argv
  if _QUICK.value:
    for flag, value in (("dims", ["1024"]), ("ranks", ["8"]), ("repeats", 5), ("svd_dim", 1024)):
      flags.FLAGS[flag].value = value
  repeats = _REPEATS.value
  implementations = _IMPLEMENTATIONS.value
  unknown = set(implementations) - {"default", "view", "xla", "pallas", "auto"}
  if unknown:
    raise app.UsageError(f"--implementations: unknown {sorted(unknown)}; choose from default, "
                         "view, xla, pallas, auto.")
  rows = []
  for d in map(int, _DIMS.value):
    x = jax.random.normal(jax.random.key(2), (_TOKENS.value, d), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(3), (_TOKENS.value, d), jnp.float32)
    dense_call = (dense_step_fn(d), (x, cotangent))
    for r in map(int, _RANKS.value):
      for method in ("lora", "dora"):
        calls = [dense_call]
        for impl in implementations:
          kernel_option = None if impl in ("default", "view") else impl
          spec = lrj.adapters.get(method, rank=r, alpha=2.0 * r, implementation=kernel_option)
          step, state = adapted_step_fn(d, spec, view_path=impl == "view")
          calls.append((step, (state, x, cotangent)))
        dense, *seconds = median_seconds(calls, repeats)
        for impl, s in zip(implementations, seconds):
          rows.append(dict(method=method, implementation=impl, d=d, rank=r,
                           dense_s=dense, adapted_s=s, ratio=s / dense))
  svd_repeats = max(3, repeats // 5)
  exact = time_init("pissa", _SVD_DIM.value, _SVD_RANK.value, svd_repeats)
  randomized = time_init("pissa_niter_4", _SVD_DIM.value, _SVD_RANK.value, svd_repeats)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"tokens={_TOKENS.value}, float32, median of {repeats}")
  print(f"{'method':<8}{'impl':<9}{'d':>6}{'r':>5}{'dense ms':>11}{'adapted ms':>12}{'ratio':>8}")
  for row in rows:
    print(f"{row['method']:<8}{row['implementation']:<9}{row['d']:>6}{row['rank']:>5}{1e3 * row['dense_s']:>11.2f}"
          f"{1e3 * row['adapted_s']:>12.2f}{row['ratio']:>8.3f}")
  print(f"\nPiSSA init on a {_SVD_DIM.value}x{_SVD_DIM.value} kernel, rank {_SVD_RANK.value}: "
        f"exact SVD {exact:.3f} s, pissa_niter_4 {randomized:.3f} s, "
        f"ratio {randomized / exact:.3f}")
  result = dict(device=str(jax.devices()[0]), backend=jax.default_backend(),
                machine=platform.machine(), cpus=os.cpu_count(), tokens=_TOKENS.value,
                repeats=repeats, layers=rows,
                pissa_init=dict(dim=_SVD_DIM.value, rank=_SVD_RANK.value, exact_s=exact,
                                niter4_s=randomized, ratio=randomized / exact))
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

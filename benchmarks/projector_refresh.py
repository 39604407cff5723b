"""Projector refresh time and captured gradient energy: svd vs randomized vs dct (vs random).

    python -m benchmarks.projector_refresh [--dim=2048] [--rank=128] [--quick]

For each strategy of `lowrank_jax.optim.projection`, the jitted refresh of
one (dim, dim) gradient is timed (median of ``--repeats`` after a warm-up)
and its captured energy ``||P^T G||_F^2 / ||G||_F^2`` measured, on two
synthetic gradients:

* ``power_law``: ``G = U diag(k^-1) V^T`` with random orthonormal U, V (a
  decaying spectrum with no preferred basis);
* ``smooth``: the same spectrum with U, V the first DCT-II basis vectors mixed
  by a small random rotation, i.e. gradients varying smoothly along their
  rows, the case where a fixed frequency basis is expected to do well.

Times are ratios against the exact SVD measured in the same run. ``--quick``
uses dim 256, rank 16. Prints a table and writes
benchmarks/results/projector_refresh.json.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from lowrank_jax import linalg
from lowrank_jax.optim import projection

_DIM = flags.DEFINE_integer("dim", 2048, "Gradient size (dim x dim).")
_RANK = flags.DEFINE_integer("rank", 128, "Projection rank.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed refreshes (median reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Small setting: dim 256, rank 16, 3 repeats.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/projector_refresh.json", "JSON output path.")

STRATEGIES = [
    ("svd", {}),
    ("randomized", {"niter": 0}),
    ("randomized", {"niter": 1}),
    ("randomized", {"niter": 2}),
    ("dct", {}),
    ("random", {"distribution": "orthogonal"}),
]


def gradients(dim: int) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  spectrum = 1.0 / jnp.arange(1, dim + 1, dtype=jnp.float32)
  u = linalg.orthonormalize(jax.random.normal(keys[0], (dim, dim)))
  v = linalg.orthonormalize(jax.random.normal(keys[1], (dim, dim)))
  basis = linalg.dct_matrix(dim).T
  mix = lambda key: linalg.orthonormalize(jnp.eye(dim) + 0.05 * jax.random.normal(key, (dim, dim)))
  return {
      "power_law": (u * spectrum) @ v.T,
      "smooth": ((basis @ mix(keys[2])) * spectrum) @ (basis @ mix(keys[3])).T,
  }


def measure(strategy: str, options: dict, g: jax.Array, rank: int, repeats: int) -> dict:
  projector = projection.Projector(rank=rank, strategy=strategy, **options)
  plan = projector.plan({"g": g})["g"]
  state = projector.init_leaf(plan, jnp.float32)
  refresh = jax.jit(lambda s, g: projector.refresh(plan, s, g, jnp.zeros((), jnp.int32), 0))
  new = jax.block_until_ready(refresh(state, g))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(refresh(state, g))
    times.append(time.perf_counter() - start)
  captured = projector.project(plan, new, g)
  energy = float(jnp.sum(captured * captured) / jnp.sum(g * g))
  return {"seconds": statistics.median(times), "energy": energy}


def main(_):
  dim, rank, repeats = (256, 16, 3) if _QUICK.value else (_DIM.value, _RANK.value, _REPEATS.value)
  rows = []
  for kind, g in gradients(dim).items():
    best = float(jnp.sum(jnp.square(jnp.linalg.svd(g, compute_uv=False)[:rank])) / jnp.sum(g * g))
    results = [(s, o, measure(s, o, g, rank, repeats)) for s, o in STRATEGIES]
    svd_seconds = results[0][2]["seconds"]
    for strategy, options, r in results:
      label = strategy + "".join(f" {k}={v}" for k, v in options.items())
      rows.append({"gradient": kind, "strategy": label, "seconds": r["seconds"],
                   "time_vs_svd": r["seconds"] / svd_seconds, "energy": r["energy"],
                   "energy_vs_best": r["energy"] / best})
  print(f"projector refresh, {dim}x{dim} gradient, rank {rank}, backend {jax.default_backend()}")
  print(f"{'gradient':<10} {'strategy':<31} {'ms':>9} {'x svd':>7} {'energy':>7} {'/best':>6}")
  for row in rows:
    print(f"{row['gradient']:<10} {row['strategy']:<31} {1e3 * row['seconds']:9.2f} "
          f"{row['time_vs_svd']:7.3f} {row['energy']:7.4f} {row['energy_vs_best']:6.3f}")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"dim": dim, "rank": rank, "repeats": repeats, "backend": jax.default_backend(),
               "device": str(jax.devices()[0]), "rows": rows}, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

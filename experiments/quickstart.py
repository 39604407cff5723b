"""Quickstart: LoRA, DoRA and PiSSA on a frozen MLP fit to a low-rank teacher update.

    python -m experiments.quickstart [--steps=200] [--rank=4]

A frozen random MLP is the pretrained base; the teacher is the same MLP whose
hidden layer got an update of rank ``true_rank``. Each method is attached to
that layer, trained with Adam on the adapter parameters only, merged, and
checked: the merged plain model gives the adapted outputs. Prints a table of
final loss, trainable parameters and merge error.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags
from flax import nnx

import lowrank_jax as lrj

_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per method.")
_RANK = flags.DEFINE_integer("rank", 4, "Adapter rank.")
_TRUE_RANK = flags.DEFINE_integer("true_rank", 4, "Rank of the teacher's weight update.")
_LR = flags.DEFINE_float("learning_rate", 1e-2, "Adam learning rate.")


BASE_SEED = 0


class MLP(nnx.Module):

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_in, d_hidden, rngs=rngs)
    self.hidden = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
    self.down = nnx.Linear(d_hidden, d_out, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.hidden(jax.nn.gelu(self.up(x)))))


def teacher_task(key, true_rank: int, n: int = 512):
  """A frozen base MLP, and inputs/targets of the MLP with a low-rank update."""
  k_u, k_v, k_x = jax.random.split(key, 3)
  teacher = MLP(16, 64, 8, rngs=nnx.Rngs(BASE_SEED))
  u = jax.random.normal(k_u, (64, true_rank)) / 8.0
  v = jax.random.normal(k_v, (true_rank, 64)) / 8.0
  teacher.hidden.kernel[...] += u @ v
  x = jax.random.normal(k_x, (n, 16))
  return x, teacher(x)


def train(method: str, spec, x, y, steps: int, learning_rate: float):
  model = MLP(16, 64, 8, rngs=nnx.Rngs(BASE_SEED))  # the teacher's base, before its update
  if spec is not None:
    lrj.attach(model, [("hidden", spec)], rngs=nnx.Rngs(1))
    wrt = lrj.AdapterParam
  else:
    wrt = nnx.Param
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=wrt)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss

  start = time.perf_counter()
  losses = [float(step(model, optimizer)) for _ in range(steps)]
  seconds = time.perf_counter() - start
  trainable = sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(model, wrt)))
  merge_error = 0.0
  if spec is not None:
    print(f"\n{method}:\n{lrj.summary(model)}")
    adapted = model(x)
    lrj.merge(model)
    merge_error = float(jnp.abs(model(x) - adapted).max())
  final = float(jnp.mean((model(x) - y) ** 2))
  return dict(method=method, initial=losses[0], final=final, params=trainable,
              merge_error=merge_error, steps_per_s=steps / seconds)


def main(argv):
  del argv
  x, y = teacher_task(jax.random.key(0), _TRUE_RANK.value)
  r = _RANK.value
  methods = {
      "full": None,
      "lora": lrj.adapters.lora(rank=r, alpha=2.0 * r),
      "dora": lrj.adapters.dora(rank=r, alpha=2.0 * r),
      "pissa": lrj.adapters.lora(rank=r, alpha=2.0 * r, init="pissa"),
  }
  rows = [train(name, spec, x, y, _STEPS.value, _LR.value) for name, spec in methods.items()]
  header = f"\n{'method':<8}{'initial loss':>14}{'final loss':>14}{'trainable':>11}{'merge err':>11}{'steps/s':>9}"
  print(header)
  for row in rows:
    print(f"{row['method']:<8}{row['initial']:>14.5f}{row['final']:>14.6f}{row['params']:>11,}"
          f"{row['merge_error']:>11.1e}{row['steps_per_s']:>9.0f}")


if __name__ == "__main__":
  app.run(main)

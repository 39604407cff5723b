"""Tasks: what a config trains (model, batches, loss), registered by name.

A `Task` bundles four functions of the config:

* ``build_model(config, rngs)`` -> the NNX model, before adapters;
* ``train_batches(config, start_step)`` -> an iterator of batches, the same
  batches for the same seed whatever ``start_step`` (resume skips exactly);
* ``eval_batches(config)`` -> a fixed list of validation batches;
* ``loss(model, batch)`` -> (scalar loss, dict of scalar metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  build_model: Callable[[Any, nnx.Rngs], nnx.Module]
  train_batches: Callable[[Any, int], Iterator[Batch]]
  eval_batches: Callable[[Any], list[Batch]]
  loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


_TASKS: dict[str, Task] = {}


def register(name: str, task: Task) -> None:
  _TASKS[name] = task


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(_TASKS)}.")
  return _TASKS[name]


def names() -> list[str]:
  return sorted(_TASKS)


def indexed_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                    start_step: int) -> Iterator[Batch]:
  """Random batches of rows; the batch of step t depends only on (seed, t)."""
  n = len(next(iter(arrays.values())))
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
  step = start_step
  while True:
    rows = np.random.default_rng([seed, step]).choice(n, batch_size, replace=False)
    yield {k: v[rows] for k, v in arrays.items()}
    step += 1


# -- teacher-student regression ---------------------------------------------------
class TeacherStudentMLP(nnx.Module):
  """x -> down(gelu(hidden(gelu(up(x))))); the adapted layer is 'hidden'."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_in, d_hidden, rngs=rngs)
    self.hidden = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
    self.down = nnx.Linear(d_hidden, d_out, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.hidden(jax.nn.gelu(self.up(x)))))


def _student(config) -> TeacherStudentMLP:
  m = config.model
  return TeacherStudentMLP(m.d_in, m.d_hidden, m.d_out, rngs=nnx.Rngs(m.base_seed))


def _teacher_data(config, split: str) -> dict[str, np.ndarray]:
  m, d = config.model, config.data
  teacher = _student(config)
  key = jax.random.key(d.task_seed)
  k_u, k_v, k_train, k_val = jax.random.split(key, 4)
  u = jax.random.normal(k_u, (m.d_hidden, d.update_rank)) / np.sqrt(m.d_hidden)
  v = jax.random.normal(k_v, (d.update_rank, m.d_hidden)) / np.sqrt(d.update_rank)
  teacher.hidden.kernel[...] += d.update_scale * (u @ v)
  n = d.n_train if split == "train" else d.n_val
  x = jax.random.normal(k_train if split == "train" else k_val, (n, m.d_in))
  return {"x": np.asarray(x), "y": np.asarray(teacher(x))}


def _mse(model, batch):
  loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
  return loss, {}


register("teacher_student", Task(
    build_model=lambda config, rngs: _student(config),
    train_batches=lambda config, start: indexed_batches(
        _teacher_data(config, "train"), config.batch_size, config.seed, start),
    eval_batches=lambda config: [_teacher_data(config, "validation")],
    loss=_mse,
))

"""train_and_evaluate: the training loop behind every experiment.

Builds the task's model, attaches the config's adapters with `lrj.attach`,
builds the optimizer by registry name, and trains with a jitted, buffer-donating
step on a ('data', 'fsdp') mesh over all devices. Evaluates every
``eval_every`` steps, checkpoints with orbax every ``checkpoint_every`` steps
(keeping the last ``keep_checkpoints``) and resumes from the latest checkpoint
in ``workdir``. Metrics go to ``workdir/metrics.jsonl`` and TensorBoard event
files; a loss-curve PNG is written at the end. A non-finite loss stops the run
(or gradient norm) stops the run with `TrainingDiverged`, naming the first bad
step; the last good checkpoint is kept.

Step-boundary events (``config.events``: ``(name, kwargs)`` pairs of the
`lowrank_jax.reparam.events` registry, e.g. POET's merge-then-reinitialize)
run after the optimizer step of every step where they are due, on the merged
model; runs with events also checkpoint the frozen state, which events change.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

import lowrank_jax as lrj
from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments import optimizers
from experiments import sharding
from experiments import tasks


class TrainingDiverged(FloatingPointError):
  """The training loss became NaN or infinite."""


def adapter_rules(config) -> list[tuple[str, Any]]:
  """The attach rules of a config: every target regex gets the config's adapter spec."""
  spec = lrj.adapters.get(config.method, **config.adapter.to_dict())
  return [(target, spec) for target in config.targets]


def load_pretrained(model: nnx.Module, workdir: str) -> None:
  """Load the parameters of a full-training run's latest checkpoint in ``workdir`` into ``model``."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"init_from={workdir!r} has no config.json: not a training workdir.")
  with open(config_path) as f:
    pretrain_config = ml_collections.ConfigDict(json.load(f))
  if pretrain_config.method != "full":
    raise ValueError(f"init_from={workdir!r} trained with method={pretrain_config.method!r}; "
                     "only full-training checkpoints hold every parameter.")
  nnx.update(model, restore_latest(pretrain_config, workdir)["trainable"])


def calibration_stats(config, task: tasks.Task, model: nnx.Module, rules) -> dict | None:
  """Calibration statistics for gradient inits and rank allocation, if the config asks for them.

  The first ``config.calibration.num_batches`` training batches (a function
  of the seed) give the mean gradient of the task loss w.r.t. every
  adapted kernel (`lowrank_jax.calibrate.collect`).
  """
  calibration = config.get("calibration")
  if calibration is None or not calibration.num_batches:
    return None
  loss = lambda m, batch: task.loss(m, batch)[0]
  return lrj.calibrate.collect(model, rules, loss, task.train_batches(config, 0),
                               num_batches=calibration.num_batches)


def build_model(config, task: tasks.Task) -> nnx.Module:
  """The task's model (from ``init_from`` if set) with the config's adapters attached.

  With ``config.rank_allocation`` (keyword arguments of
  `lowrank_jax.adapters.gora.allocate`) the ranks are allocated per site from
  the calibration statistics (GoRA) before attaching.
  """
  model = task.build_model(config, nnx.Rngs(config.seed))
  if config.get("init_from"):
    load_pretrained(model, config.init_from)
  if config.method != "full":
    rules = adapter_rules(config)
    stats = calibration_stats(config, task, model, rules)
    if config.get("rank_allocation") is not None:
      from lowrank_jax.adapters import gora  # pylint: disable=g-import-not-at-top
      rules = gora.allocate(model, stats, rules, **config.rank_allocation.to_dict())
    lrj.attach(model, rules, rngs=nnx.Rngs(params=config.seed + 1, dropout=config.seed + 2),
               calibration=stats)
  return model


def trainable_filter(config):
  """Every nnx.Param for 'full'; else the adapter parameters, plus the parameters of the
  modules whose path fully matches a regex of ``config.train_also`` (e.g. a new head)."""
  if config.method == "full":
    return nnx.Param
  patterns = [re.compile(p) for p in config.get("train_also", [])]
  if not patterns:
    return lrj.AdapterParam

  def also_trained(path, value):
    module = "/".join(str(p) for p in path[:-1])
    return isinstance(value, nnx.Param) and any(p.fullmatch(module) for p in patterns)

  return nnx.Any(lrj.AdapterParam, also_trained)


def build_events(config) -> list[lrj.reparam.Event]:
  """The config's step-boundary events, built from ``config.events`` ((name, kwargs) pairs)."""
  return [lrj.reparam.events.build(name, **(kwargs.to_dict() if hasattr(kwargs, "to_dict")
                                            else dict(kwargs)))
          for name, kwargs in config.get("events", ())]


def run_events(events, step: int, mesh, graphdef, wrt, trainable, opt_state, rng_state, frozen):
  """Run the events due at ``step`` on the merged model; returns the split (and placed) state."""
  due = [event for event in events if event.due(step)]
  if not due:
    return trainable, opt_state, rng_state, frozen
  model = nnx.merge(graphdef, trainable, rng_state, frozen)
  for event in due:
    model, opt_state = event(model, opt_state, step)
  _, trainable, rng_state, frozen = nnx.split(model, wrt, nnx.RngState, ...)
  trainable = jax.device_put(trainable, sharding.state_shardings(trainable, mesh))
  frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh))
  return trainable, opt_state, rng_state, frozen


def checkpoint_state(events, trainable, opt_state, rng_state, frozen) -> dict[str, Any]:
  """What a checkpoint holds: the trained state, plus the frozen state if events change it."""
  state = {"trainable": trainable, "opt_state": opt_state, "rng": rng_state}
  return dict(state, frozen=frozen) if events else state


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
                 if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


def tree_size(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def make_steps(graphdef, eval_graphdef, task: tasks.Task, tx):
  def train_step(trainable, opt_state, rng_state, first_bad, frozen, batch, step):
    def loss_fn(trainable):
      model = nnx.merge(graphdef, trainable, rng_state, frozen)
      loss, aux = task.loss(model, batch)
      return loss, (aux, nnx.state(model, nnx.RngState))

    (loss, (aux, rng_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    first_bad = jnp.where((first_bad == 0) & ~finite, step, first_bad)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm)
    return trainable, opt_state, rng_state, first_bad, metrics

  def eval_step(trainable, rng_state, frozen, batch):
    model = nnx.merge(eval_graphdef, trainable, rng_state, frozen)
    loss, aux = task.loss(model, batch)
    return dict(aux, loss=loss)

  return (jax.jit(train_step, donate_argnums=(0, 1, 2, 3)), jax.jit(eval_step))


def _evaluate(eval_step, trainable, rng_state, frozen, batches, mesh) -> dict[str, float]:
  totals: dict[str, float] = {}
  for batch in batches:
    for name, value in eval_step(trainable, rng_state, frozen, sharding.shard_batch(batch, mesh)).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return {f"val_{name}": total / len(batches) for name, total in totals.items()}


def _progress(total: int, initial: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Train per ``config`` in ``workdir`` (resuming if it has a checkpoint).

  Returns:
    A summary: final train and validation metrics, trainable parameter count,
    optimizer-state bytes, steps per second (excluding the first step).
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  task = tasks.get(config.task)
  model = build_model(config, task)
  wrt = trainable_filter(config)
  model.train()
  tx = optimizers.build(config, model)
  graphdef, trainable, rng_state, frozen = nnx.split(model, wrt, nnx.RngState, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  del model

  mesh = sharding.make_mesh(config)
  trainable = jax.device_put(trainable, sharding.state_shardings(trainable, mesh))
  frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh))
  opt_state = jax.jit(tx.init)(trainable)
  train_step, eval_step = make_steps(graphdef, eval_graphdef, task, tx)
  events = build_events(config)

  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  start = checkpointer.latest_step() or 0
  if start:
    restored = checkpointer.restore(
        start, checkpoint_state(events, trainable, opt_state, rng_state, frozen))
    trainable, opt_state, rng_state = restored["trainable"], restored["opt_state"], restored["rng"]
    frozen = restored.get("frozen", frozen)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  batches = task.train_batches(config, start)
  eval_batches = task.eval_batches(config)
  first_bad = jnp.zeros((), jnp.int32)
  last_good = start

  def check_finite(step):
    bad = int(first_bad)
    if bad:
      raise TrainingDiverged(
          f"Loss or gradient became non-finite at step {bad}; stopping. The last good checkpoint "
          f"(step {last_good}) is kept in {checkpointer.directory}.")

  summary: dict[str, Any] = {}
  progress = _progress(config.steps, start, config.progress)
  timer_start, timed_steps = None, 0
  try:
    for step in range(start + 1, config.steps + 1):
      batch = sharding.shard_batch(next(batches), mesh)
      trainable, opt_state, rng_state, first_bad, step_metrics = train_step(
          trainable, opt_state, rng_state, first_bad, frozen, batch, jnp.int32(step))
      trainable, opt_state, rng_state, frozen = run_events(
          events, step, mesh, graphdef, wrt, trainable, opt_state, rng_state, frozen)
      if timer_start is None:
        jax.block_until_ready(step_metrics["loss"])
        timer_start = time.perf_counter()
      else:
        timed_steps += 1
      is_last = step == config.steps
      if step % config.log_every == 0 or is_last:
        check_finite(step)
        elapsed = time.perf_counter() - timer_start
        steps_per_s = timed_steps / elapsed if timed_steps and elapsed > 0 else float("nan")
        scalars = {k: float(v) for k, v in step_metrics.items()}
        writer.write(step, **scalars, steps_per_s=steps_per_s)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", steps_per_s=f"{steps_per_s:.1f}")
      if step % config.eval_every == 0 or is_last:
        writer.write(step, **_evaluate(eval_step, trainable, rng_state, frozen, eval_batches, mesh))
      if step % config.checkpoint_every == 0 or is_last:
        check_finite(step)
        checkpointer.save(step, checkpoint_state(events, trainable, opt_state, rng_state, frozen))
        last_good = step
      progress.update(1)
  finally:
    progress.close()
    writer.close()
    checkpointer.close()

  records = metrics_lib.read_metrics(writer.path)
  for record in records:  # the latest value of every metric, also across resumes
    summary.update({(k if k.startswith("val_") or k == "steps_per_s" else f"train_{k}"): v
                    for k, v in record.items() if k != "step"})
  metrics_lib.plot_loss_curves({config.method: records}, os.path.join(workdir, "loss.png"),
                               title=f"{config.task}: {config.method}")
  summary.update(
      steps=config.steps,
      trainable_params=tree_size(trainable),
      optimizer_state_bytes=tree_bytes(opt_state),
  )
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in summary.items()}, f, indent=2)
  return summary


def restore_latest(config, workdir: str) -> dict[str, Any]:
  """The state ({'trainable', 'opt_state', 'rng'}, and 'frozen' for runs with events) of the
  latest checkpoint in ``workdir``."""
  task = tasks.get(config.task)
  model = build_model(config, task)
  _, trainable, rng_state, frozen = nnx.split(model, trainable_filter(config), nnx.RngState, ...)
  opt_state = optimizers.build(config, model).init(trainable)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}.")
    return checkpointer.restore(
        step, checkpoint_state(build_events(config), trainable, opt_state, rng_state, frozen))
  finally:
    checkpointer.close()

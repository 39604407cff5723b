"""Shared config pieces: the training fields every experiment has, and arg parsing."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, defaults: dict) -> dict:
  """Parse a ``key=value,key=value`` config arg into typed values (typed by ``defaults``).

  Unknown keys raise with the accepted ones listed.
  """
  values = dict(defaults)
  if not arg:
    return values
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"Config arg item {item!r} must be key=value; accepted keys: {sorted(defaults)}.")
    key, raw = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"Unknown config arg {key!r}; accepted keys: {sorted(defaults)}.")
    kind = type(defaults[key])
    if kind is bool:
      values[key] = raw.lower() in ("1", "true", "yes")
    else:
      values[key] = kind(raw)
  return values


def training_fields(config: ml_collections.ConfigDict, *, steps: int, batch_size: int,
                    learning_rate: float, optimizer: str = "adamw") -> None:
  """Fields read by experiments.loop.train_and_evaluate."""
  config.seed = 0
  config.steps = steps
  config.batch_size = batch_size
  config.log_every = max(1, steps // 50)
  config.eval_every = max(1, steps // 5)
  config.checkpoint_every = max(1, steps // 5)
  config.keep_checkpoints = 2
  config.progress = True
  config.optimizer = ml_collections.ConfigDict(dict(
      name=optimizer, learning_rate=learning_rate, warmup_steps=0, schedule="constant",
      restart_every=0, restart_warmup_steps=0, clip_norm=0.0, kwargs=ml_collections.ConfigDict()))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def step_overrides(steps: int) -> dict:
  """Study overrides that change ``steps`` and scale the logging, eval and checkpoint periods
  with it as `training_fields` does."""
  return {"steps": steps, "log_every": max(1, steps // 50), "eval_every": max(1, steps // 5),
          "checkpoint_every": max(1, steps // 5)}


def study_sizes(args: dict) -> tuple[tuple[int, ...], dict]:
  """Seeds and run overrides from a study's ``steps``, ``seeds`` and ``runlocal`` args.

  runlocal: seed 0, 2 steps, no progress bar. Otherwise seeds 0..seeds-1 and, when
  steps > 0, `step_overrides` (steps = 0 keeps each run config's own steps).
  """
  if args["seeds"] < 1 or args["steps"] < 0:
    raise ValueError(f"seeds must be >= 1 and steps >= 0, got seeds={args['seeds']}, "
                     f"steps={args['steps']}.")
  if args["runlocal"]:
    return (0,), {"steps": 2, "progress": False}
  return tuple(range(args["seeds"])), step_overrides(args["steps"]) if args["steps"] else {}


def adapter_fields(config: ml_collections.ConfigDict, method: str, targets: list[str],
                   **hyperparams) -> None:
  """``method`` ('full' or an adapter registry name), its hyperparameters and target regexes."""
  config.method = method
  config.targets = targets
  config.adapter = ml_collections.ConfigDict(hyperparams if method != "full" else {})


def adapter_hyperparams(method: str, rank: int, init: str = "default") -> dict:
  """The adapter hyperparameters of the configs' ``method``/``rank``/``init`` args.

  LoRA-family methods take ``rank``, ``alpha = 2 rank`` and ``init``; StelLA
  takes ``rank`` and ``alpha`` (its own inits are StelLA's, ``init`` must stay
  'default'); 'full' has none.
  """
  if method == "full":
    return {}
  if method == "stella":
    if init != "default":
      raise ValueError(f"method=stella takes no LoRA init (got init={init!r}).")
    return dict(rank=rank, alpha=2.0 * rank)
  return dict(rank=rank, alpha=2.0 * rank, init=init)


def calibration_fields(config: ml_collections.ConfigDict, *, init: str, calibration_batches: int,
                       allocate: bool) -> None:
  """Calibration for gradient inits (LoRA-GA, LoRA-One, GoRA) and GoRA rank allocation.

  A gradient init or ``allocate`` with ``calibration_batches=0`` uses 8 batches.
  ``allocate`` adds ``rank_allocation`` (keyword arguments of gora.allocate).
  """
  from lowrank_jax.adapters import init as lora_init  # pylint: disable=g-import-not-at-top
  needs = lora_init.needs_grad(init) or allocate
  if needs:
    config.calibration = ml_collections.ConfigDict(dict(num_batches=calibration_batches or 8))
  if allocate:
    config.rank_allocation = ml_collections.ConfigDict(dict(min_rank=1))

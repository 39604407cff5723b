"""The optimizer of a config: a registry name, a learning-rate schedule, clipping."""

from __future__ import annotations

import optax


def _lowrank_registry():
  try:
    from lowrank_jax import optim  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return optim


def lookup(name: str):
  """The optimizer factory named ``name``: lowrank_jax.optim first, then optax(.contrib)."""
  optim = _lowrank_registry()
  if optim is not None and name in optim.names():
    return lambda **kw: optim.get(name, **kw)
  for module in (optax, optax.contrib):
    factory = getattr(module, name, None)
    if callable(factory):
      return factory
  known = sorted(optim.names()) if optim is not None else []
  raise ValueError(f"Unknown optimizer {name!r}: not in lowrank_jax.optim ({known}) nor in "
                   "optax or optax.contrib.")


def schedule(config) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then ``constant`` or ``cosine`` decay to 0, re-warmed up
  after every restart when ``restart_every > 0`` (ReLoRA's jagged schedule)."""
  o = config.optimizer
  base = _base_schedule(config)
  if not o.get("restart_every", 0):
    return base
  from lowrank_jax.reparam import relora  # pylint: disable=g-import-not-at-top
  return relora.jagged_schedule(base, o.restart_every, o.restart_warmup_steps)


def _base_schedule(config) -> optax.Schedule:
  o = config.optimizer
  warmup = min(o.warmup_steps, config.steps)
  if o.schedule == "constant":
    decay = optax.constant_schedule(o.learning_rate)
  elif o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(o.learning_rate, max(config.steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {o.schedule!r}.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), decay], [warmup])


def build(config, model=None) -> optax.GradientTransformation:
  """``clip_by_global_norm(clip_norm)`` (if > 0) then the named optimizer on the schedule.

  With ``model``, the learning-rate multipliers its layers define (NOBLE's official
  ones, `lowrank_jax.reparam.noble.lr_multipliers`) scale the schedule per parameter.
  """
  o = config.optimizer
  kwargs = o.kwargs.to_dict() if hasattr(o.kwargs, "to_dict") else dict(o.kwargs)
  factory = lookup(o.name)
  make_tx = lambda learning_rate: factory(learning_rate=learning_rate, **kwargs)
  if model is None:
    tx = make_tx(schedule(config))
  else:
    from lowrank_jax.reparam import noble  # pylint: disable=g-import-not-at-top
    tx = noble.optimizer(make_tx, schedule(config), model)
  if o.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx


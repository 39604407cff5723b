"""experiments.optimizers: the config's optimizer, with the model's learning-rate multipliers."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import loop
from experiments import optimizers
from experiments import tasks
from lowrank_jax.optim import labels
from lowrank_jax.reparam import noble


def _noble_setup(optimizer="sgd"):
  config = importlib.import_module("configs.pretrain_reparam").get_config(
      "method=noble,runlocal=true")
  with config.unlocked():
    config.optimizer.name = optimizer
    config.optimizer.kwargs = {}
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.clip_norm = 0.0
  model = loop.build_model(config, tasks.get(config.task))
  _, trainable, _ = nnx.split(model, loop.trainable_filter(config), ...)
  return config, model, trainable


def test_noble_runs_get_the_official_multiplier_on_every_leaf():
  config, model, trainable = _noble_setup()
  table = noble.lr_multipliers(model)
  assert len(set(table.values())) > 1  # several multipliers, not just 1
  tx = optimizers.build(config, model)
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  lr = config.optimizer.learning_rate
  flat = {labels.key_names(path): np.asarray(u)
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  assert set(table) <= set(flat)
  for names, update in flat.items():  # SGD: the update is -lr * multiplier * grad
    np.testing.assert_allclose(update, -lr * table.get(names, 1.0), rtol=1e-6, err_msg=str(names))


def test_without_the_model_every_leaf_has_the_base_rate():
  config, _, trainable = _noble_setup()
  tx = optimizers.build(config)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)
  for u in jax.tree_util.tree_leaves(updates):
    np.testing.assert_allclose(u, -config.optimizer.learning_rate, rtol=1e-6)

"""Helpers shared by the test modules: a one-layer host model and random adapter perturbations.

Importable from every test module (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import jax
from flax import nnx

import lowrank_jax as lrj


class Host(nnx.Module):
  """A model holding the layer under test at path 'layer'."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def attached_linear(spec, fan_in: int, fan_out: int, seed: int = 0) -> Host:
  """A Host of ``nnx.Linear(fan_in, fan_out)`` (params seed ``seed``) with ``spec`` attached."""
  model = Host(nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed)))
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(seed + 1))
  return model


def randomized(tree, seed: int, scale: float):
  """``tree`` with ``scale`` times independent standard normal noise added to every leaf."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)])


def randomize_adapters(model: nnx.Module, seed: int, scale: float) -> None:
  """Move every ``AdapterParam`` of ``model`` off its init (``randomized``), in place."""
  nnx.update(model, randomized(nnx.state(model, lrj.AdapterParam), seed, scale))

"""A model holding one layer at path 'layer', the host of the single-layer adapter tests.

Importable from every test module (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

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

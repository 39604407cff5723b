"""A multilayer perceptron with layers at paths ``layers/<i>``."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx

from lowrank_jax.models import layers as layer_lib


class MLP(nnx.Module):
  """``layers[-1](act(... act(layers[0](x))))`` for widths ``dims = (d_in, ..., d_out)``."""

  def __init__(self, dims: Sequence[int], *, rngs: nnx.Rngs,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu):
    if len(dims) < 2:
      raise ValueError(f"dims needs at least an input and an output width, got {tuple(dims)}.")
    self.activation = activation
    self.layers = nnx.List([layer_lib.dense(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = self.activation(layer(x))
    return self.layers[-1](x)

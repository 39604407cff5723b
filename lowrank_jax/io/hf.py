"""Load Hugging Face safetensors checkpoints into our NNX models.

A checkpoint tensor name is our variable path with '.' for '/', except that
``kernel`` (our (in, out) layout) is HF's ``weight`` transposed, and a norm's
``scale`` or an embedding's ``embedding`` is HF's ``weight``. A ``rename``
function maps our module paths to the checkpoint's where the names differ
(LLaMA). Every tensor is checked (present, shape) before the model is touched:
a missing tensor or a shape mismatch raises naming the key, and the model is
left unchanged.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model (the message names the tensor)."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays, with clear errors."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint file {path}.")
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own types for truncated or corrupt files
    raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _on_device_of(variable: nnx.Variable, value: np.ndarray) -> jax.Array:
  """``value`` as a device array with the variable's dtype and sharding.

  A NumPy leaf would be copied to the device again on every jitted call (and a
  transposed view transposed again), so the copy happens here, once.
  """
  current = variable.get_value()
  sharding = current.sharding if isinstance(current, jax.Array) else None
  return jax.device_put(np.asarray(value, dtype=variable.dtype), sharding)


def load_new(make_model: Callable[[], nnx.Module], tensors: dict[str, np.ndarray],
             rename: Callable[[str], str] = lambda name: name) -> nnx.Module:
  """``make_model()`` built abstractly (``nnx.eval_shape``) and filled from ``tensors``.

  No parameter is randomly initialized only to be overwritten, which for a
  large checkpoint would cost an init's time and a second copy of the weights.
  The model may hold nothing but ``nnx.Param`` variables (all come from the
  checkpoint).
  """
  model = nnx.eval_shape(make_model)
  others = [path for path, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))]
  if others:
    raise CheckpointError(f"{type(model).__name__} holds variables that are not parameters, which "
                          f"no checkpoint fills: {['/'.join(map(str, p)) for p in others]}.")
  return load_into(model, tensors, rename)


def load_into(model: nnx.Module, tensors: dict[str, np.ndarray],
              rename: Callable[[str], str] = lambda name: name) -> nnx.Module:
  """Copy checkpoint tensors into every ``nnx.Param`` of ``model`` (all or nothing)."""
  state = nnx.state(model, nnx.Param)
  updated = []
  for path, variable in nnx.to_flat_state(state):
    *module, leaf = [str(p) for p in path]
    if leaf not in _LEAF_NAMES:
      raise CheckpointError(f"Parameter '{'/'.join(module + [leaf])}' has no checkpoint naming rule.")
    key = rename(".".join(module)) + "." + _LEAF_NAMES[leaf]
    if key not in tensors:
      raise CheckpointError(f"The checkpoint lacks tensor {key!r} (for '{'/'.join(module + [leaf])}').")
    value = tensors[key].T if leaf == "kernel" else tensors[key]
    if tuple(value.shape) != tuple(variable.shape):
      raise CheckpointError(f"Tensor {key!r} has shape {tuple(tensors[key].shape)}; the model needs "
                            f"{tuple(variable.shape)}{' (transposed)' if leaf == 'kernel' else ''}.")
    updated.append((path, variable.replace(_on_device_of(variable, value))))
  nnx.update(model, nnx.from_flat_state(updated))
  return model

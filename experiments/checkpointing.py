"""Orbax checkpoints of the training state, keyed by step.

The state is any pytree (nnx.State, optax states, step counters). It is
flattened to a dict of numbered leaves for orbax and restored into the tree
structure of a freshly built state, so no Python objects are pickled. Typed
PRNG keys are stored as their raw key data.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_key(leaf) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_saveable(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_leaves(tree)
  return {f"{i:05d}": (jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)}


def _from_saveable(saved: dict[str, Any], like: Any) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten(like)
  if len(saved) != len(leaves):
    raise ValueError(
        f"Checkpoint has {len(saved)} arrays but the current state has {len(leaves)}: the "
        "checkpoint was written by a different configuration (model, adapters or optimizer).")
  restored = []
  for i, ref in enumerate(leaves):
    value = saved[f"{i:05d}"]
    if _is_key(ref):
      value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref))
    elif tuple(np.shape(value)) != tuple(np.shape(ref)):
      raise ValueError(f"Checkpoint array {i} has shape {np.shape(value)}, expected "
                       f"{np.shape(ref)}: the checkpoint belongs to a different configuration.")
    restored.append(value)
  return jax.tree_util.tree_unflatten(treedef, restored)


class Checkpointer:
  """Save and restore training state in ``workdir/checkpoints``, keeping the last ``keep``."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(_to_saveable(state)))
    self.manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        _to_saveable(like))
    saved = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    return _from_saveable(saved, like)

  def close(self) -> None:
    self.manager.close()

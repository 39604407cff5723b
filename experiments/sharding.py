"""A device mesh with ('data', 'fsdp') axes, and the shardings of state and batches.

Parameters carry logical axis names in their ``out_sharding`` metadata (the
models and the adapters set them); names that are mesh axes ('data', 'fsdp')
shard along that axis, any other name (or a dimension the axis size does not
divide) is replicated. Batches are sharded along their leading axis over
'data' (and 'fsdp', which also splits the batch in FSDP).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(config) -> Mesh:
  """Mesh over all devices; ``mesh.data = -1`` takes the devices ``fsdp`` leaves."""
  n = jax.device_count()
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data > 0 else n // max(fsdp, 1)
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} must equal the {n} devices.")
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  return Mesh(devices, AXES)


def _spec_for(variable: nnx.Variable, mesh: Mesh) -> P:
  names = variable.get_metadata().get("out_sharding") or ()
  shape = variable.shape if hasattr(variable, "shape") else ()
  axes = []
  for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
    usable = name in mesh.shape and dim % mesh.shape[name] == 0
    axes.append(name if usable else None)
  return P(*axes)


def state_shardings(state: nnx.State, mesh: Mesh):
  """NamedShardings for every variable of an nnx.State, from its annotations."""
  return jax.tree_util.tree_map(
      lambda v: v.replace(NamedSharding(mesh, _spec_for(v, mesh))), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXES))


def shard_batch(batch, mesh: Mesh):
  """Put a batch on the mesh, leading axis split over all devices."""
  size = mesh.size
  for name, value in batch.items():
    if np.shape(value)[0] % size:
      raise ValueError(f"Batch field {name!r} has {np.shape(value)[0]} rows, not divisible by "
                       f"the {size} devices of the mesh.")
  return jax.device_put(batch, batch_sharding(mesh))

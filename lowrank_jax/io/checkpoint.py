"""Orbax checkpoints of adapters only, or of the full model state.

An adapter-only checkpoint holds the `AdapterParam` leaves (and `AdapterBuffer`
state) of a model, keyed by their '/'-joined paths, plus a JSON description of
every adapter site (path, method, hyperparameters). Restoring needs a model
with the same adapters attached (same rules, any init); the description is
checked first, so a checkpoint for another configuration fails with the
differing site named, and the model is left unchanged. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lowrank_jax.attach import adapters as adapter_sites
from lowrank_jax.adapters import base as adapter_base

_ADAPTER_STATE = (adapter_base.AdapterParam, adapter_base.AdapterBuffer)


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, path)): np.asarray(value)
          for path, value in nnx.to_flat_state(state)
          for value in [value[...] if isinstance(value, nnx.Variable) else value]}


def describe_adapters(model: nnx.Module) -> dict[str, Any]:
  """{path: {'method', 'hyperparameters', 'fan_in', 'fan_out'}} for every adapter site."""
  sites = {}
  for path, adapter in adapter_sites(model):
    hyper = {f.name: getattr(adapter.spec, f.name) for f in dataclasses.fields(adapter.spec)}
    sites[path] = dict(method=adapter.spec.name, fan_in=adapter.view.fan_in,
                       fan_out=adapter.view.fan_out,
                       hyperparameters={k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                            else str(v)) for k, v in hyper.items()})
  return sites


def _save(directory: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "arrays"), arrays, force=True)
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def _read_meta(directory: str) -> dict[str, Any]:
  meta_path = os.path.join(os.path.abspath(directory), "meta.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory} is not a lowrank_jax checkpoint (no meta.json).")
  with open(meta_path) as f:
    return json.load(f)


def _load(directory: str, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The arrays of a checkpoint, after checking names and shapes against ``like``."""
  directory = os.path.abspath(directory)
  meta = _read_meta(directory)
  missing = sorted(set(like) - set(meta["arrays"]))
  extra = sorted(set(meta["arrays"]) - set(like))
  if missing or extra:
    raise ValueError(f"Checkpoint {directory} does not match the model: missing arrays "
                     f"{missing[:5]}, unexpected arrays {extra[:5]}.")
  for key, value in like.items():
    saved_shape = tuple(meta["arrays"][key]["shape"])
    if saved_shape != value.shape:
      raise ValueError(f"Checkpoint array '{key}' has shape {saved_shape}; the model's is "
                       f"{value.shape}.")
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in like.items()}
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(directory, "arrays"), target)


def _meta(arrays: dict[str, np.ndarray], **extra) -> dict[str, Any]:
  return dict(extra, arrays={k: dict(shape=list(v.shape), dtype=str(v.dtype))
                             for k, v in arrays.items()})


def _update(model: nnx.Module, state: nnx.State, arrays: dict[str, Any]) -> None:
  flat = []
  for path, variable in nnx.to_flat_state(state):
    flat.append((path, variable.replace(arrays["/".join(map(str, path))])))
  nnx.update(model, nnx.from_flat_state(flat))


def save_adapters(model: nnx.Module, directory: str) -> None:
  """Save the adapter parameters and buffers of ``model`` (not the frozen base)."""
  arrays = _flat(nnx.state(model, _ADAPTER_STATE))
  if not arrays:
    raise ValueError("The model has no adapters to save; use save_state for a plain model.")
  _save(directory, arrays, _meta(arrays, kind="adapters", sites=describe_adapters(model)))


def restore_adapters(model: nnx.Module, directory: str) -> nnx.Module:
  """Load adapter parameters saved by `save_adapters` into ``model`` (same adapters attached).

  Weight-aware inits (PiSSA, OLoRA, ...) change the base kernel at attach time;
  restoring adapters alone restores the adapters, so attach with the same init
  and seed on the same base, or use `save_state` / `restore_state`.
  """
  saved_sites = _read_meta(directory).get("sites", {})
  ours = describe_adapters(model)
  for path in sorted(set(saved_sites) | set(ours)):
    if saved_sites.get(path) != ours.get(path):
      raise ValueError(f"Adapter site '{path}' differs between the checkpoint "
                       f"({saved_sites.get(path)}) and the model ({ours.get(path)}).")
  state = nnx.state(model, _ADAPTER_STATE)
  _update(model, state, _load(directory, _flat(state)))
  return model


def save_state(model: nnx.Module, directory: str) -> None:
  """Save every variable of ``model`` (base, adapters, buffers; RNG state excluded)."""
  state = nnx.state(model, nnx.Not(nnx.RngState))
  arrays = _flat(state)
  _save(directory, arrays, _meta(arrays, kind="state", sites=describe_adapters(model)))


def restore_state(model: nnx.Module, directory: str) -> nnx.Module:
  """Load a `save_state` checkpoint into a model of the same structure."""
  state = nnx.state(model, nnx.Not(nnx.RngState))
  _update(model, state, _load(directory, _flat(state)))
  return model

"""Calibration statistics for inits and rank allocations that need data.

``calibration`` (the argument of ``lrj.attach`` and ``spec.build``) maps a
module path ('blocks/0/attn/query') to a `SiteStats`: statistics of that
site, all float32, in the (fan_in, fan_out) matrix layout of
`lowrank_jax.adapters.layers.LayerView`.

`collect` computes them in one pass over calibration batches, as GoRA
(He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation", 2025) and
LoRA-GA (Wang et al., "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation", 2024) do with backward hooks on the frozen weights:

* ``grad``: the mean over batches of dL/dW0 for each site's frozen kernel;
* ``input_sq_norm`` / ``input_gram``: ``sum_t x_t^2`` and ``X^T X`` over all
  input rows t of the site, where a row is the site's input in the fan_in
  layout (for a convolution, one image patch), obtained by contracting the
  input with an identity factor through the layer's own contraction.

Everything is accumulated in float32 on device, batch by batch. With
``cache_dir`` the result is saved with orbax and loaded instead of recomputed
when the same sites and settings are asked for again.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lowrank_jax.attach import _set_child
from lowrank_jax.attach import select
from lowrank_jax.adapters import layers
from lowrank_jax.adapters.stats import SiteStats
from lowrank_jax.adapters.stats import site_stats

__all__ = ["SiteStats", "collect", "site_stats"]

Array = jax.Array




class _Probe(nnx.Module):
  """Stand-in for a site during calibration: the base forward plus input statistics."""

  def __init__(self, base: nnx.Module, view: layers.LayerView, gram: bool):
    self.base = base
    self.view = view
    self.sq_norm = nnx.Variable(jnp.zeros((view.fan_in,), jnp.float32))
    self.gram = nnx.Variable(jnp.zeros((view.fan_in, view.fan_in), jnp.float32)) if gram else None
    self.rows = nnx.Variable(jnp.zeros((), jnp.float32))

  def __call__(self, x, **kwargs):
    eye = jnp.eye(self.view.fan_in, dtype=jnp.float32)
    rows = self.view.project_in(self.base, jax.lax.stop_gradient(x), eye, **kwargs)
    rows = rows.reshape(-1, self.view.fan_in).astype(jnp.float32)
    self.sq_norm[...] += jnp.sum(rows * rows, axis=0)
    if self.gram is not None:
      self.gram[...] += rows.T @ rows
    self.rows[...] += rows.shape[0]
    return self.base(x, **kwargs)


_FIELDS = ("grad", "input_sq_norm", "input_gram")


def _settings(sites: dict[str, layers.LayerView], num_batches: int, grad: bool,
              activations: str | None) -> dict[str, Any]:
  return dict(num_batches=num_batches, grad=grad, activations=activations,
              sites={name: [view.fan_in, view.fan_out] for name, view in sites.items()})


def _load_cache(directory: str, settings: dict[str, Any]) -> dict[str, SiteStats] | None:
  meta_path = os.path.join(directory, "calibration.json")
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  if meta["settings"] != settings:
    raise ValueError(
        f"The calibration cache in {directory} was collected with other settings or sites "
        f"({meta['settings']}) than asked for now ({settings}); use another cache_dir.")
  target = {k: jax.ShapeDtypeStruct(tuple(shape), jnp.float32) for k, shape in meta["arrays"].items()}
  with ocp.StandardCheckpointer() as checkpointer:
    arrays = checkpointer.restore(os.path.join(directory, "arrays"), target)
  return {name: SiteStats(**{f: arrays.get(f"{name}/{f}") for f in _FIELDS},
                          num_tokens=meta["num_tokens"][name])
          for name in settings["sites"]}


def _save_cache(directory: str, settings: dict[str, Any], stats: dict[str, SiteStats]) -> None:
  arrays = {f"{name}/{f}": np.asarray(getattr(s, f)) for name, s in stats.items() for f in _FIELDS
            if getattr(s, f) is not None}
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "arrays"), arrays, force=True)
  meta = dict(settings=settings, arrays={k: list(v.shape) for k, v in arrays.items()},
              num_tokens={name: s.num_tokens for name, s in stats.items()})
  with open(os.path.join(directory, "calibration.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def collect(model: nnx.Module, rules: Sequence[Any], loss_fn: Callable[[nnx.Module, Any], Array],
            batches: Iterable[Any], *, num_batches: int | None = None, grad: bool = True,
            activations: str | None = None, cache_dir: str | None = None) -> dict[str, SiteStats]:
  """Per-site calibration statistics of ``model`` over ``batches``, in one pass.

  Args:
    model: the model the adapters will be attached to (unchanged on return).
    rules: the attach rules; the sites are the modules they give an adapter.
    loss_fn: ``loss_fn(model, batch) -> scalar`` (a mean over the batch).
    batches: an iterable of batches; the first ``num_batches`` are used (all
      of them when None).
    num_batches: how many batches to use.
    grad: collect the mean gradient of the loss w.r.t. each site's kernel.
    activations: None, 'sq_norm' (per-feature sums of squares) or 'gram'
      (sums of squares and ``X^T X``).
    cache_dir: a directory to save the statistics to and load them from.

  Returns:
    ``{path: SiteStats}`` with float32 arrays in the (fan_in, fan_out) layout.

  Raises:
    ValueError: bad ``activations``/``num_batches``, nothing to collect, no
      batches, a cache collected for other sites or settings.
  """
  if activations not in (None, "sq_norm", "gram"):
    raise ValueError(f"activations must be None, 'sq_norm' or 'gram', got {activations!r}.")
  if not grad and activations is None:
    raise ValueError("collect: nothing to collect; set grad=True and/or activations.")
  if num_batches is not None and num_batches < 1:
    raise ValueError(f"num_batches must be >= 1 (or None for all batches), got {num_batches}.")
  targets = select(model, rules)
  sites = {name: layers.view_of(module, name) for _, name, module, _ in targets}
  settings = _settings(sites, num_batches or -1, grad, activations)
  if cache_dir is not None:
    cached = _load_cache(os.path.abspath(cache_dir), settings)
    if cached is not None:
      return cached

  probes = {}
  if activations is not None:
    for path, name, module, _ in targets:
      probes[name] = _Probe(module, sites[name], gram=activations == "gram")
      _set_child(model, path, probes[name])
  kernel_paths = {name: tuple(path) + (("base",) if probes else ()) + ("kernel",)
                  for path, name, _, _ in targets}
  wanted = set(kernel_paths.values())
  is_site_kernel = lambda path, _: tuple(path) in wanted

  @nnx.jit
  def step(model, batch):
    if not grad:
      loss_fn(model, batch)
      return {}
    diff = nnx.DiffState(0, nnx.All(nnx.Param, is_site_kernel))
    grads = nnx.grad(loss_fn, argnums=diff)(model, batch)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
    return {name: sites[name].to_matrix(flat[kp][...]).astype(jnp.float32)
            for name, kp in kernel_paths.items()}

  try:
    sums, count = None, 0
    for batch in batches:
      if num_batches is not None and count == num_batches:
        break
      grads = step(model, batch)
      sums = grads if sums is None else jax.tree_util.tree_map(jnp.add, sums, grads)
      count += 1
    if count == 0:
      raise ValueError("collect: `batches` yielded no batch.")
    if num_batches is not None and count < num_batches:
      raise ValueError(f"collect: num_batches={num_batches} but `batches` yielded only {count}.")
    stats = {}
    for _, name, _, _ in targets:
      probe = probes.get(name)
      stats[name] = SiteStats(
          grad=sums[name] / count if grad else None,
          input_sq_norm=probe.sq_norm[...] if probe is not None else None,
          input_gram=probe.gram[...] if probe is not None and probe.gram is not None else None,
          num_tokens=int(probe.rows[...]) if probe is not None else 0)
  finally:
    for path, name, module, _ in targets:
      if name in probes:
        _set_child(model, path, module)
  if cache_dir is not None:
    _save_cache(os.path.abspath(cache_dir), settings, stats)
  return stats

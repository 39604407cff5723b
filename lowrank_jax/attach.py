"""Attach adapters to an NNX model by path rules; merge, unmerge, summarize.

A rule is ``(regex, spec_or_None)``. Every submodule path of the model, the
'/'-joined attribute names and list/dict keys (``'blocks/0/attn/query'``), is
matched with ``re.fullmatch`` against the rules in order; the first matching
rule decides: a spec wraps the module in that adapter, None leaves it alone.
Modules inside an adapter (its ``base``) are not candidates. A rule's spec may
also be a ``{name: spec}`` mapping: the module gets a `MultiAdapter` holding
those named adapters (`lowrank_jax.adapters.multi`).
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.adapters import multi

Rule = tuple[str, "adapter_base.AdapterSpec | None"]


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined string of an NNX path tuple."""
  return "/".join(str(p) for p in path)


def _iter_modules(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Module]]:
  """(path, module) for every submodule, not descending into adapters.

  ``nnx.iter_graph`` may yield children before their parents, so the adapter
  paths are collected first.
  """
  nodes = [(tuple(path), node) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Module) and path]
  adapter_paths = [p for p, node in nodes if isinstance(node, adapter_base.Adapter)]
  for path, node in nodes:
    if not any(len(p) < len(path) and path[: len(p)] == p for p in adapter_paths):
      yield path, node


def _candidates(model: nnx.Module) -> list[str]:
  return [path_str(p) for p, m in _iter_modules(model) if isinstance(m, layers.SUPPORTED_LAYERS)]


_CONTAINERS = (nnx.List, nnx.Dict, list, dict)


def _set_child(model: nnx.Module, path: tuple[Any, ...], value: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, _CONTAINERS) else getattr(parent, key)
  if isinstance(parent, _CONTAINERS):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _compile_rules(rules: Sequence[Rule]) -> list[tuple[re.Pattern, Any]]:
  if isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], str):
    rules = [rules]
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise TypeError(f"Rule {i} must be a (regex, spec or None) pair, got {rule!r}.")
    pattern, spec = rule
    if isinstance(spec, Mapping):
      spec = multi.MultiSpec(adapters=spec)
    if spec is not None and not isinstance(spec, adapter_base.AdapterSpec):
      raise TypeError(f"Rule {i} ({pattern!r}): expected an AdapterSpec, a {{name: spec}} "
                      f"mapping or None, got {spec!r}.")
    try:
      compiled.append((re.compile(pattern), spec))
    except re.error as e:
      raise ValueError(f"Rule {i}: invalid regex {pattern!r}: {e}") from None
  return compiled


def select(model: nnx.Module, rules: Sequence[Rule]
           ) -> list[tuple[tuple[Any, ...], str, nnx.Module, "adapter_base.AdapterSpec"]]:
  """The (path, name, module, spec) sites that ``rules`` give an adapter, in traversal order.

  The first rule whose regex fully matches a module's path decides for it.

  Raises:
    ValueError: a rule matching no module (candidate paths listed), a rule
      selecting an already adapted module.
    UnsupportedLayerError: a rule selecting a module that is not linear-like.
  """
  compiled = _compile_rules(rules)
  matched = [False] * len(compiled)
  targets = []
  for path, module in _iter_modules(model):
    name = path_str(path)
    for i, (pattern, spec) in enumerate(compiled):
      if pattern.fullmatch(name):
        matched[i] = True
        if spec is not None:
          targets.append((path, name, module, spec))
        break
    for i, (pattern, _) in enumerate(compiled):  # later rules that also match count as used
      if not matched[i] and pattern.fullmatch(name):
        matched[i] = True
  unused = [compiled[i][0].pattern for i, m in enumerate(matched) if not m]
  if unused:
    raise ValueError(
        f"Attach rules {unused} match no module path. Candidate linear-like paths: "
        f"{_candidates(model)}.")
  for path, name, module, spec in targets:
    if isinstance(module, adapter_base.Adapter):
      raise ValueError(
          f"Module '{name}' already has a {type(module).__name__} adapter "
          f"({module.spec.name}); merge it first (lrj.merge) or target another path.")
    layers.view_of(module, name)  # raises UnsupportedLayerError with the path
  return targets


def attach(model: nnx.Module, rules: Sequence[Rule] | str, *, rngs: nnx.Rngs,
           calibration: Any = None,
           adapters: Mapping[str, "adapter_base.AdapterSpec"] | None = None) -> nnx.Module:
  """Wrap the submodules of ``model`` selected by ``rules`` in adapters, in place.

  Args:
    model: any NNX module (nested modules, nnx.List / nnx.Dict of layers).
    rules: ordered ``(regex, spec or None)`` pairs; the first rule whose regex
      fully matches a module's path decides for that module.
    rngs: random streams for the adapters' initialization (``params``) and
      dropout (``dropout``).
    calibration: per-site statistics for inits that need data
      (`lowrank_jax.calibrate.collect`), passed to each spec's ``build``.
    adapters: ``{name: spec}``: several named adapters per selected module (a
      `MultiAdapter`); rules may then be bare regexes (or one regex), each
      meaning ``(regex, adapters)``.

  State shared across layers (`AdapterSpec.shared_state`) is created once per
  distinct spec per call and handed to every ``build`` of that spec.

  Returns:
    ``model`` itself, with adapters in place.

  Raises:
    ValueError: a rule matching no module (candidate paths listed), a rule
      selecting an already adapted module, bad hyperparameters for a layer.
    UnsupportedLayerError: a rule selecting a module that is not linear-like.
  """
  if adapters is not None:
    rules = [rules] if isinstance(rules, str) else rules
    rules = [(r, adapters) if isinstance(r, str) else r for r in rules]
  targets = select(model, rules)
  shared = _shared_states(targets, rngs)
  for path, name, module, spec in targets:
    state = next(s for other, s in shared if other == spec)
    extra = {} if state is None else {"shared": state}
    _set_child(model, path, spec.build(module, rngs=rngs, calibration=calibration, path=name,
                                       **extra))
  return model


def _shared_states(targets, rngs: nnx.Rngs) -> list[tuple[Any, Any]]:
  """(spec, spec.shared_state(sites)) for each distinct spec of ``targets``, in order."""
  specs = []
  for _, _, _, spec in targets:
    if not any(other == spec for other in specs):
      specs.append(spec)
  return [(spec, spec.shared_state([(name, module) for _, name, module, other in targets
                                    if other == spec], rngs=rngs))
          for spec in specs]


def adapters(model: nnx.Module) -> list[tuple[str, adapter_base.Adapter]]:
  """(path, adapter) for every adapter in ``model``, in traversal order."""
  return [(path_str(p), m) for p, m in _iter_modules(model)
          if isinstance(m, adapter_base.Adapter)]


def merge(model: nnx.Module, *, keep_adapters: bool = False) -> nnx.Module:
  """Fold every adapter into its base layer, in place; returns ``model``.

  With ``keep_adapters=False`` each adapter is replaced by its base module,
  whose kernel becomes the merged kernel: the result is the plain model.
  With ``keep_adapters=True`` the merged kernel is written into the base and
  the adapter stays, marked merged (its forward is the base's), so that
  `unmerge` can restore training; only additive methods allow this.
  Raises ValueError before changing anything if an adapter is not mergeable.
  """
  found = [(p, m) for p, m in _iter_modules(model) if isinstance(m, adapter_base.Adapter)]
  for _, adapter in found:
    adapter.check_mergeable()
  for path, adapter in found:
    name = path_str(path)
    if keep_adapters:
      if not adapter.additive:
        raise ValueError(
            f"Adapter '{name}' ({adapter.spec.name}) is not additive; merge(keep_adapters=True) "
            "and unmerge support additive methods only. Use merge(model) instead.")
      if not adapter.merged:
        adapter.merge()
        adapter.merged = True
    else:
      _set_child(model, path, adapter.merge())
  return model


def unmerge(model: nnx.Module) -> nnx.Module:
  """Undo ``merge(model, keep_adapters=True)``: ``W0 = W_merged - delta``."""
  for _, adapter in adapters(model):
    if adapter.merged:
      kernel = adapter.base.kernel
      kernel[...] = (kernel[...].astype(np.float32) - adapter.delta()).astype(kernel.dtype)
      adapter.merged = False
  return model


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def summary(model: nnx.Module) -> str:
  """A table of the adapters in ``model`` (path, base layer, method, shape, params added)."""
  rows = [("path", "base", "method", "fan_in x fan_out", "params added")]
  for name, adapter in adapters(model):
    view = adapter.view
    added = _count(nnx.state(adapter, adapter_base.AdapterParam))
    rows.append((name, type(adapter.base).__name__, adapter.spec.name,
                 f"{view.fan_in} x {view.fan_out}", f"{added:,}"))
  trainable = _count(nnx.state(model, adapter_base.AdapterParam))
  total = _count(nnx.state(model, nnx.Param))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  share = 100.0 * trainable / total if total else 0.0
  lines.append(f"adapter params: {trainable:,} of {total:,} parameters ({share:.3f}%)")
  return "\n".join(lines)

"""Adapters on the parameter pytree of any JAX function (Linen, Equinox, plain functions).

``adapted_apply, adapter_params = adapt(apply_fn, params, rules, key=key)`` returns a
function called as ``adapted_apply(adapter_params, params, *args, **kwargs)`` that
computes ``apply_fn(params, *args, **kwargs)`` with the adapters of ``rules`` in
place. It is a pure function of its arguments (jit, grad and vmap apply), and
training differentiates ``adapter_params`` only.

One implementation per method. Every site is adapted by the registered NNX
adapter module of its spec (`lowrank_jax.adapters`), built once by ``adapt``
around a stand-in NNX base layer (nnx.Linear / LinearGeneral / Einsum / Conv)
that holds the site's kernel. ``adapt`` keeps the adapter's graph definition
and its state; each call merges them with the kernel of the ``params`` given to
that call (``nnx.merge``), so the method's forward, ``effective_kernel`` and
``merge`` are the ones `lrj.attach` uses.

Sites and rule matching. Rules are the ``(regex, spec or None)`` pairs of
`lrj.attach`, matched with ``re.fullmatch`` against site names, first match
wins. A site name is the '/'-joined key path of a params leaf, with a trailing
``/kernel`` removed: the Linen kernel ``params/Encoder/layer_0/attn/query/kernel``
is the site ``params/Encoder/layer_0/attn/query``, like an NNX module path; a
plain-function leaf ``w1`` is the site ``w1``. A rule whose spec is not None
must select a 2-D-reducible kernel: a ``kernel`` leaf, or any 2-D array leaf
(read as (fan_in, fan_out) with ``y = x @ w``). A ``kernel`` with more than two
dims (Conv, DenseGeneral, Einsum) reads as a matrix only through its layer, so
``adapt`` then needs ``example_args`` to see which Linen layer owns it.

Unmerged computation. During a call, every Linen ``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Conv`` at an adapted site is
intercepted (``flax.linen.intercept_methods``) and replaced by the adapter's
forward on an NNX twin of that layer: ``x W0 + s (x A) B`` for LoRA, never
``W0 + s A B``. Everywhere else (plain functions, Equinox, Linen layers of
other types) the site's leaf is replaced by the adapter's merged kernel, which
is exact for every method; the merged kernels of intercepted sites are
computed but unused, so under ``jax.jit`` XLA removes them. Methods that are
inherently multiplicative (DoRA's column norm, OFT-style rotations) compute
whatever their NNX forward computes in both cases.

Frozen adapter state. ``adapter_params`` holds the trainable leaves
(`AdapterParam`) only, ``{site: {leaf: array}}``. The frozen state, the
adapters' `AdapterBuffer` leaves, dropout RNG state and, for weight-aware
inits (PiSSA, OLoRA, MiLoRA, ...), the residual base kernel that replaces the
site's kernel, is ``adapted_apply.frozen``, used by every call; pass it as an
argument with ``adapted_apply.call(adapter_params, frozen, params, ...)`` to
keep large residuals out of a jitted function's constants. ``params`` given to
calls is always the ORIGINAL base params.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.attach import Rule
from lowrank_jax.attach import _compile_rules  # pylint: disable=protected-access
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers

Array = jax.Array
PyTree = Any

LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
"""The Linen layer types whose calls are routed through the adapter's unmerged forward."""


class AdapterTreeError(ValueError):
  """Adapter params whose tree does not match the adaptation they are given to."""


# -- params tree paths -----------------------------------------------------------
def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(_key_str(k) for k in path), leaf) for path, leaf in flat]


def _site_name(keys: tuple[str, ...]) -> str:
  return "/".join(keys[:-1] if keys and keys[-1] == "kernel" else keys)


def _reducible(keys: tuple[str, ...], leaf) -> bool:
  ndim = getattr(leaf, "ndim", 0)
  return ndim == 2 or (keys[-1] == "kernel" and ndim > 2)


def _replace_leaves(tree: PyTree, values: dict[tuple[str, ...], Any]) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [values.get(tuple(_key_str(k) for k in path), leaf) for path, leaf in flat]
  return jax.tree_util.tree_unflatten(treedef, leaves)


# -- NNX stand-ins of Linen layers ----------------------------------------------------
def _const(value):
  return lambda *_: value


def _standin(module: nn.Module | None, kernel: Array, bias: Array | None,
             einsum_str: str | None, name: str) -> nnx.Module:
  """The NNX layer computing what the Linen ``module`` computes, holding ``kernel``/``bias``.

  ``module`` None (a leaf whose layer is not known) gives an ``nnx.Linear`` on a
  2-D kernel, with a bias where the kernel has a sibling 'bias' leaf.
  """
  rngs = nnx.Rngs(0)
  common = dict(kernel_init=_const(kernel), param_dtype=kernel.dtype, rngs=rngs)
  if bias is not None:
    common["bias_init"] = _const(bias)
  if module is None:
    return nnx.Linear(kernel.shape[0], kernel.shape[1], use_bias=bias is not None, **common)
  if module.promote_dtype is not nn.dtypes.promote_dtype:
    raise layers.UnsupportedLayerError(
        f"{type(module).__name__} at '{name}' has a custom promote_dtype; adapters support "
        "Linen layers with the default one.")
  common.update(dtype=module.dtype, precision=module.precision, use_bias=module.use_bias)
  if type(module) is nn.Dense:
    if kernel.ndim != 2:
      raise layers.UnsupportedLayerError(
          f"nn.Dense at '{name}' owns a kernel of shape {tuple(kernel.shape)}; Dense kernels are "
          "2-D (stacked layers, e.g. under nn.scan, are not supported).")
    extra = {} if module.dot_general is None else {"dot_general": module.dot_general}
    return nnx.Linear(kernel.shape[0], module.features, **common, **extra)
  if type(module) is nn.DenseGeneral:
    if module.batch_dims:
      raise layers.UnsupportedLayerError(
          f"nn.DenseGeneral at '{name}' has batch_dims={module.batch_dims}; adapters support "
          "DenseGeneral layers without batch dims.")
    features = tuple(module.features) if isinstance(module.features, Sequence) else (module.features,)
    extra = {} if module.dot_general is None else {"dot_general": module.dot_general}
    return nnx.LinearGeneral(kernel.shape[: kernel.ndim - len(features)], features,
                             axis=module.axis, **common, **extra)
  if type(module) is nn.Einsum:
    einsum_str = einsum_str or module.einsum_str
    del common["use_bias"]
    return nnx.Einsum(einsum_str, kernel.shape, None if bias is None else bias.shape,
                      preferred_element_type=module.preferred_element_type, **common)
  if type(module) is nn.Conv:
    extra = ({} if module.conv_general_dilated is None
             else {"conv_general_dilated": module.conv_general_dilated})
    kernel_size = module.kernel_size
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    return nnx.Conv(kernel.shape[-2] * module.feature_group_count, module.features, kernel_size,
                    module.strides, padding=module.padding, input_dilation=module.input_dilation,
                    kernel_dilation=module.kernel_dilation,
                    feature_group_count=module.feature_group_count, mask=module.mask,
                    **common, **extra)
  raise layers.UnsupportedLayerError(f"{type(module).__name__} at '{name}' is not a supported layer.")


def _einsum_str(args, kwargs) -> str | None:
  return kwargs.get("einsum_str", args[1] if len(args) > 1 else None)


def _discover(apply_fn, params, args, kwargs) -> dict[tuple[str, ...], tuple[nn.Module, Any]]:
  """Scope path -> (Linen layer, einsum_str) of every supported layer ``apply_fn`` calls."""
  found = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__" and type(module) in LINEN_LAYERS and module.scope:
      found[tuple(module.scope.path)] = (module, _einsum_str(call_args, call_kwargs))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: apply_fn(p, *args, **kwargs), params)
  return found


def _owner(keys: tuple[str, ...], scopes) -> Any:
  """The scope path whose layer owns the kernel at ``keys`` (at most one collection key before)."""
  parent = keys[:-1]
  for prefix in (0, 1):
    if tuple(parent[prefix:]) in scopes:
      return tuple(parent[prefix:])
  return None


# -- one adapted site ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted params leaf.

  Attributes:
    name: the site name the rules matched.
    kernel_keys: key path of the kernel leaf in params.
    bias_keys: key path of the sibling 'bias' leaf, or None.
    spec: the adapter spec.
    view: the kernel's (fan_in, fan_out) reading.
    graphdef: the adapter module's graph definition.
    base_template: pure dict of the stand-in base's state (shapes only).
  """

  name: str
  kernel_keys: tuple[str, ...]
  bias_keys: tuple[str, ...] | None
  spec: adapter_base.AdapterSpec
  view: layers.LayerView
  graphdef: Any
  base_template: Any


def _stop_gradient(x):
  if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
    return jax.lax.stop_gradient(x)
  return x


def _is_base(path, value) -> bool:
  del value
  return bool(path) and path[0] == "base"


def _fill_base(template, kernel, bias, name):
  def fill(d):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out[k] = fill(v)
      elif k == "kernel":
        out[k] = kernel
      elif k == "bias":
        out[k] = bias
      else:
        raise ValueError(f"Site '{name}': unexpected base-layer state {k!r}.")
    return out
  return nnx.State(fill(template))


class AdaptedApply:
  """``apply_fn`` with adapters on selected params leaves; made by `adapt`.

  Call as ``adapted_apply(adapter_params, params, *args, dropout_key=None, **kwargs)``;
  ``dropout_key`` None runs the adapters deterministically (no adapter dropout).
  """

  def __init__(self, apply_fn: Callable, sites: list[Site], frozen: dict[str, Any],
               expected: dict[str, Any], scopes: dict[tuple[str, ...], str]):
    self.apply_fn = apply_fn
    self.sites = {site.name: site for site in sites}
    self.frozen = frozen
    self._expected = expected
    self._scopes = scopes  # Linen scope path -> site name, filled by example_args discovery

  def __call__(self, adapter_params, params, *args, dropout_key=None, **kwargs):
    return self.call(adapter_params, self.frozen, params, *args, dropout_key=dropout_key, **kwargs)

  # -- building adapter modules from state --------------------------------------------
  def check(self, adapter_params) -> None:
    """Raises `AdapterTreeError` naming the first path where ``adapter_params`` differ."""
    check_same_tree(self._expected, adapter_params, "adapter_params")

  def _base_values(self, site: Site, frozen, params_flat):
    if site.kernel_keys not in params_flat:
      raise KeyError(f"params has no leaf {'/'.join(site.kernel_keys)!r} for the adapted site "
                     f"'{site.name}'; pass the params adapt was called with.")
    kernel = frozen[site.name].get("residual", params_flat[site.kernel_keys])
    bias = params_flat[site.bias_keys] if site.bias_keys else None
    return jax.lax.stop_gradient(kernel), bias

  def adapter(self, name: str, adapter_params, frozen, params_flat, *, dropout_key=None,
              base: nnx.Module | None = None) -> adapter_base.Adapter:
    """The NNX adapter of site ``name`` on the current kernel (or on ``base``)."""
    site = self.sites[name]
    kernel, bias = self._base_values(site, frozen, params_flat)
    rest = jax.tree_util.tree_map(_stop_gradient, frozen[name]["state"])
    module = nnx.merge(site.graphdef, nnx.State(adapter_params[name]),
                       _fill_base(site.base_template, kernel, bias, name), rest)
    if base is not None:
      if layers.view_of(base, name) != site.view:
        raise ValueError(
            f"Site '{name}': the layer called at run time reads as {layers.view_of(base, name)}, "
            f"but adapt read its kernel as {site.view}. Pass example_args to adapt so it sees "
            "the layer.")
      module.base = base
    if dropout_key is None:
      module.eval()
    else:
      module.train()
      site_key = jax.random.fold_in(dropout_key, sorted(self.sites).index(name))
      # Dropout draws from the 'dropout' stream, or from 'default' where adapt's
      # nnx.Rngs(key) has no 'dropout' stream.
      nnx.reseed(module, dropout=site_key, default=site_key)
    return module

  # -- the call ---------------------------------------------------------------------------
  def call(self, adapter_params, frozen, params, *args, dropout_key=None, **kwargs):
    """The adapted forward with the frozen adapter state as an explicit argument."""
    self.check(adapter_params)
    params_flat = dict(_flat(params))
    merged = self._merged_values(adapter_params, frozen, params_flat)
    # Sites whose merge adds a bias the params lack, or that have no merged kernel at all
    # (input-dependent or nonlinear updates), work only through an intercepted layer call.
    needs_interception = {name for name, (_, bias_added) in merged.items() if bias_added}
    needs_interception |= set(self.sites) - set(merged)
    substituted = _replace_leaves(params, {k: v for _, (vals, _) in merged.items()
                                           for k, v in vals.items()})
    intercepted = set()

    def route(next_fun, call_args, call_kwargs, context):
      module = context.module
      if context.method_name != "__call__" or type(module) not in LINEN_LAYERS or not module.scope:
        return next_fun(*call_args, **call_kwargs)
      name = self._site_of_scope(tuple(module.scope.path))
      if name is None:
        return next_fun(*call_args, **call_kwargs)
      site = self.sites[name]
      kernel, bias = self._base_values(site, frozen, params_flat)
      base = _standin(module, kernel, bias, _einsum_str(call_args, call_kwargs), name)
      adapter = self.adapter(name, adapter_params, frozen, params_flat, dropout_key=dropout_key,
                             base=base)
      intercepted.add(name)
      call_kwargs = {k: v for k, v in call_kwargs.items() if k != "einsum_str"}
      return adapter(call_args[0], **call_kwargs)

    with nn.intercept_methods(route):
      out = self.apply_fn(substituted, *args, **kwargs)
    missing = sorted(needs_interception - intercepted)
    if missing:
      raise ValueError(
          f"Sites {missing} add a bias (e.g. LoRA use_bias) to a layer whose params have none, or "
          "have no merged kernel (the method is not mergeable); that needs the layer's call to be "
          "intercepted (a Linen Dense/DenseGeneral/Einsum/Conv), and it was not.")
    return out

  def _site_of_scope(self, scope: tuple[str, ...]) -> str | None:
    if scope in self._scopes:
      return self._scopes[scope]
    for name, site in self.sites.items():
      if _owner(site.kernel_keys, {scope}) is not None:
        return name
    return None

  def _merged_values(self, adapter_params, frozen, params_flat):
    """{site: ({leaf keys: merged value}, whether the merge adds a bias the params lack)}.

    Sites of methods that are not mergeable are left out.
    """
    out = {}
    for name, site in self.sites.items():
      adapter = self.adapter(name, adapter_params, frozen, params_flat)
      if not type(adapter).mergeable:
        continue
      merged = adapter.merge()
      values = {site.kernel_keys: merged.kernel[...]}
      bias = getattr(merged, "bias", None)
      if site.bias_keys is not None:
        values[site.bias_keys] = bias[...].reshape(params_flat[site.bias_keys].shape)
      out[name] = (values, site.bias_keys is None and bias is not None)
    return out

  def merge(self, adapter_params, params) -> PyTree:
    """``params`` with every adapted kernel (and bias) replaced by the merged one."""
    self.check(adapter_params)
    params_flat = dict(_flat(params))
    for name in self.sites:
      self.adapter(name, adapter_params, self.frozen, params_flat).check_mergeable()
    merged = self._merged_values(adapter_params, self.frozen, params_flat)
    added = sorted(name for name, (_, bias_added) in merged.items() if bias_added)
    if added:
      raise ValueError(f"Sites {added} add a bias to layers whose params have no 'bias' leaf; "
                       "plain params cannot hold it. Use use_bias=False there.")
    return _replace_leaves(params, {k: v for vals, _ in merged.values() for k, v in vals.items()})

  def nnx_adapters(self, adapter_params, params) -> dict[str, adapter_base.Adapter]:
    """{site: NNX adapter module} on the kernels of ``params`` (for export and inspection)."""
    self.check(adapter_params)
    params_flat = dict(_flat(params))
    return {name: self.adapter(name, adapter_params, self.frozen, params_flat)
            for name in self.sites}


def check_same_tree(expected, given, what: str) -> None:
  """Raises `AdapterTreeError` naming the first path where ``given`` differs from ``expected``."""
  want = [("/".join(k), getattr(v, "shape", None)) for k, v in _flat(expected)]
  got = [("/".join(k), getattr(v, "shape", None)) for k, v in _flat(given)]
  for i in range(max(len(want), len(got))):
    w = want[i] if i < len(want) else None
    g = got[i] if i < len(got) else None
    if w == g:
      continue
    if w is not None and g is not None and w[0] == g[0]:
      raise AdapterTreeError(f"{what} do not match this adaptation: '{w[0]}' has shape {tuple(g[1])}, "
                             f"expected {tuple(w[1])}.")
    raise AdapterTreeError(
        f"{what} do not match this adaptation: first differing path "
        f"{('expected ' + repr(w[0])) if w else 'no further path expected'}, "
        f"got {repr(g[0]) if g else 'nothing'}. Adapter params from another model or rules?")


# -- adapt / merge ----------------------------------------------------------------------
def adapt(apply_fn: Callable, params: PyTree, rules: Sequence[Rule], *, key: Array,
          calibration: Any = None, example_args: tuple | None = None,
          example_kwargs: dict | None = None) -> tuple[AdaptedApply, dict[str, Any]]:
  """Adapters on the params leaves of ``apply_fn`` selected by ``rules``.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs)``; a Linen ``model.apply``, or
      any function of a params pytree.
    params: the base params (for Linen, the variables dict ``{'params': ...}``).
    rules: ordered ``(regex, spec or None)`` pairs matched against site names
      (see the module docstring); the first full match decides.
    key: PRNG key of the adapters' initialization, used as ``nnx.Rngs(key)``
      over the sites in sorted name order (one site gives the adapter that
      ``lrj.attach(model, rules, rngs=nnx.Rngs(key))`` gives).
    calibration: per-site statistics for data-driven inits, keyed by site name.
    example_args, example_kwargs: inputs of ``apply_fn`` (shapes suffice: they
      run under ``jax.eval_shape``) to see which Linen layer owns each kernel;
      needed for kernels with more than two dims.

  Returns:
    ``(adapted_apply, adapter_params)``, see `AdaptedApply`.

  Raises:
    ValueError: a rule matching no site (candidates listed), a rule selecting a
      leaf that is not a 2-D-reducible kernel, bad hyperparameters for a layer.
  """
  compiled = _compile_rules(rules)
  flat = _flat(params)
  flat_dict = dict(flat)
  candidates = [_site_name(k) for k, v in flat if _reducible(k, v)]
  matched = [False] * len(compiled)
  targets = []
  for keys, leaf in flat:
    name = _site_name(keys)
    hits = [i for i, (pattern, _) in enumerate(compiled) if pattern.fullmatch(name)]
    for i in hits:
      matched[i] = True
    if hits and compiled[hits[0]][1] is not None:
      targets.append((keys, name, leaf, compiled[hits[0]][1]))
  unused = [compiled[i][0].pattern for i, m in enumerate(matched) if not m]
  if unused:
    raise ValueError(f"Adapt rules {unused} match no params site. Candidate kernel sites: "
                     f"{candidates}.")
  for keys, name, leaf, _ in targets:
    if not _reducible(keys, leaf):
      raise ValueError(
          f"Rule selects '{'/'.join(keys)}' (shape {tuple(getattr(leaf, 'shape', ()))}), which is "
          f"not a 2-D-reducible kernel: adapters take 'kernel' leaves and 2-D weight leaves. "
          f"Candidate kernel sites: {candidates}.")

  layers_by_scope = {}
  if example_args is not None or example_kwargs is not None:
    layers_by_scope = _discover(apply_fn, params, tuple(example_args or ()), example_kwargs or {})
  rngs = nnx.Rngs(key)
  sites, frozen, trainable, scopes = [], {}, {}, {}
  for keys, name, leaf, spec in sorted(targets, key=lambda t: t[1]):
    kernel = jnp.asarray(leaf)
    bias_keys = keys[:-1] + ("bias",) if keys[-1] == "kernel" else None
    if bias_keys not in flat_dict:
      bias_keys = None
    scope = _owner(keys, layers_by_scope) if keys[-1] == "kernel" else None
    if scope is None and kernel.ndim != 2:
      raise ValueError(
          f"Site '{name}': kernel of shape {tuple(kernel.shape)} reads as a matrix only through "
          "its layer (Conv window + (in, out), DenseGeneral in + out, Einsum labels); pass "
          "example_args=(inputs...) to adapt so it sees the Linen layer that owns it.")
    module, einsum_str = layers_by_scope[scope] if scope is not None else (None, None)
    if scope is not None:
      scopes[scope] = name
    bias = flat_dict[bias_keys] if bias_keys else None
    if module is not None and not module.use_bias:
      bias_keys, bias = None, None
    base = _standin(module, kernel, None if bias is None else jnp.asarray(bias), einsum_str, name)
    view = layers.view_of(base, name)
    adapter = spec.build(base, rngs=rngs, calibration=calibration, path=name)
    graphdef, params_state, base_state, rest = nnx.split(adapter, adapter_base.AdapterParam,
                                                         _is_base, ...)
    site_frozen = {"state": rest}
    residual = adapter.base.kernel[...]
    if residual is not kernel and not np.array_equal(np.asarray(residual), np.asarray(kernel)):
      site_frozen["residual"] = residual
    template = nnx.to_pure_dict(jax.eval_shape(lambda s: s, base_state))
    sites.append(Site(name, keys, bias_keys, spec, view, graphdef, template))
    frozen[name] = site_frozen
    trainable[name] = nnx.to_pure_dict(params_state)
  return AdaptedApply(apply_fn, sites, frozen, jax.eval_shape(lambda t: t, trainable), scopes), trainable


def merge(params: PyTree, adapter_params: dict[str, Any], rules: Sequence[Rule], *,
          key: Array, apply_fn: Callable | None = None, calibration: Any = None,
          example_args: tuple | None = None, example_kwargs: dict | None = None) -> PyTree:
  """Plain params with the adapters of ``adapter_params`` folded in.

  Rebuilds the adaptation from the ORIGINAL ``params``, ``rules`` and ``key`` (the
  ones given to `adapt`: weight-aware inits recompute the same residual and
  random frozen buffers are redrawn from ``key``), then merges every site.
  ``apply_fn`` and ``example_args`` are needed only for kernels with more than
  two dims. Same as ``adapted_apply.merge(adapter_params, params)``.
  """
  fn = apply_fn if apply_fn is not None else (lambda p, *a, **k: None)
  adapted, _ = adapt(fn, params, rules, key=key, calibration=calibration,
                     example_args=example_args, example_kwargs=example_kwargs)
  return adapted.merge(adapter_params, params)


def export_peft(adapted_apply: AdaptedApply, adapter_params, params, directory: str, *,
                rename: Callable[[str], str] | None = None, **export_options) -> Any:
  """Write the LoRA/DoRA adapters of a functional adaptation as a PEFT adapter directory.

  ``rename`` maps a site name to the '/'-joined torch module path (default: drop
  a leading 'params/'); e.g. ``lambda s: s.replace('params/', '').replace('layer_', 'layer/')``.
  The tensors are written by `lowrank_jax.io.peft.export_peft`, with its rules
  (Linear and 2-D Conv layouts, uniform options across sites); ``export_options``
  (``module_prefix``, ``base_model_name_or_path``, ...) go to it, and its result is returned.
  """
  from lowrank_jax.io import peft  # pylint: disable=g-import-not-at-top

  rename = rename or (lambda s: re.sub(r"^params/", "", s))
  modules = adapted_apply.nnx_adapters(adapter_params, params)
  container = nnx.Dict({rename(name): module for name, module in modules.items()})
  return peft.export_peft(container, directory, **export_options)

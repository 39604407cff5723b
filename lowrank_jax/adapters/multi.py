"""Several named LoRA adapters on one layer: weighted combination or per-row routing.

One frozen base layer, adapters ``n = 1..G`` (LoRA-family specs, any ranks):

* weighted combination (``set_active``): ``y = x W0 + sum_n w_n s_n (x A_n) B_n``;
  ``set_active('math')`` is w = one-hot. The merged kernel is
  ``W0 + sum_n w_n s_n A_n B_n``. Works on every layer kind of `layers`.
* routing (``adapter_ids`` at call time, or `set_adapter_ids` for a whole
  model): row m uses adapter ``g_m`` alone, ``y_m = x_m W0 + s_g (x_m A_g) B_g``
  (-1: the base only), the multi-tenant batches of Punica (Chen et al., 2023)
  and S-LoRA (Sheng et al., 2023), computed in one product by
  `lowrank_jax.kernels.grouped_lora`; nnx.Linear layers only. Adapters of
  smaller rank are zero-padded to the largest rank in the bank.

Each adapter is an ordinary `LoRA` module sharing ``self.base``. Inits that
rewrite the base kernel (PiSSA, MiLoRA, OLoRA) and adapter biases are refused:
the base is shared, and a bias would not follow the routing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters import layers
from lowrank_jax.adapters.lora import LoRASpec
from lowrank_jax.adapters.lora import fused_linear_base
from lowrank_jax.kernels import grouped_lora as grouped_kernel

Array = jax.Array
ROUTING_IMPLEMENTATIONS = ("auto", "xla", "pallas")


class AdapterIds(nnx.Variable):
  """Per-row adapter ids stored on a `MultiAdapter` by `set_adapter_ids` (not trained)."""


def check_member(name: Any, spec: Any, where: str) -> None:
  """Raise unless ``spec`` can be one named adapter of a `MultiAdapter`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"multi-adapter{where}: adapter names must be non-empty strings, got {name!r}.")
  if not isinstance(spec, LoRASpec) or not spec.adapter_type.additive:
    raise TypeError(f"multi-adapter{where}: adapter {name!r} must be an additive LoRA-family spec "
                    f"(e.g. lrj.adapters.lora(...)), got {spec!r}.")
  if lora_init.is_weight_aware(spec.init):
    raise ValueError(f"multi-adapter{where}: adapter {name!r} has init={spec.init!r}, which "
                     "rewrites the shared base kernel; use 'default' or 'gaussian'.")
  if spec.use_bias or spec.implementation is not None:
    raise ValueError(f"multi-adapter{where}: adapter {name!r} sets use_bias or implementation; "
                     "the multi-adapter takes neither per adapter.")


@dataclasses.dataclass(frozen=True)
class MultiSpec(adapter_base.AdapterSpec):
  """Named adapters for one layer; built by ``lrj.attach(..., adapters={name: spec})``.

  Attributes:
    adapters: ``{name: spec}`` (stored as a tuple of pairs, in order).
    active: the initially active adapter name; None means the first.
    implementation: 'auto', 'xla' or 'pallas': the grouped_lora kernel used
      for routed calls.
    interpret: run the Pallas kernel in the interpreter (tests on CPU).
  """

  name = "multi"
  adapters: Any = ()
  active: str | None = None
  implementation: str = "auto"
  interpret: bool = False

  def __post_init__(self):
    items = tuple(self.adapters.items() if isinstance(self.adapters, Mapping) else self.adapters)
    object.__setattr__(self, "adapters", items)
    if not items:
      raise ValueError("multi-adapter: adapters must name at least one adapter spec.")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
      raise ValueError(f"multi-adapter: duplicate adapter names in {names}.")
    for name, spec in items:
      check_member(name, spec, "")
    if self.active is not None and self.active not in names:
      raise ValueError(f"multi-adapter: active={self.active!r} is not one of {names}.")
    if self.implementation not in ROUTING_IMPLEMENTATIONS:
      raise ValueError(f"multi-adapter: implementation must be one of {ROUTING_IMPLEMENTATIONS}, "
                       f"got {self.implementation!r}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    return MultiAdapter(base, self, layers.view_of(base, path), path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return sum(spec.num_params(fan_in, fan_out) for _, spec in self.adapters)


class MultiAdapter(adapter_base.Adapter):
  """Named LoRA adapters sharing one base layer (see the module docstring).

  Children: ``adapters`` (an nnx.Dict of `LoRA` modules). Static state:
  ``order`` (the names in the order added; adapter id g is ``order[g]``) and
  ``active``, a tuple of (name, weight) pairs.
  """

  def __init__(self, base: nnx.Module, spec: MultiSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    self.adapters = nnx.Dict()
    self.order = ()  # adapter names in the order added: ids index this (nnx.Dict sorts keys)
    self.adapter_ids = nnx.data(None)  # an AdapterIds variable while routed
    for name, member in spec.adapters:
      self.add(name, member, rngs=rngs)
    self.set_active(spec.active or spec.adapters[0][0])

  @property
  def names(self) -> list[str]:
    return list(self.order)

  def add(self, name: str, spec: LoRASpec, *, rngs: nnx.Rngs) -> "MultiAdapter":
    """Build one more adapter ``name`` on the shared base (inactive until `set_active`)."""
    where = f" at '{self.path}'"
    check_member(name, spec, where)
    if name in self.order:
      raise ValueError(f"multi-adapter{where}: an adapter named {name!r} already exists.")
    if self.merged:
      raise ValueError(f"multi-adapter{where} is merged; unmerge before adding adapters.")
    self.adapters[name] = spec.build(self.base, rngs=rngs, path=f"{self.path}/{name}")
    self.order = self.order + (name,)
    return self

  def set_active(self, active: str | Mapping[str, float] | Sequence[str]) -> "MultiAdapter":
    """The weighted combination used by calls without adapter ids.

    ``'name'`` (weight 1), a sequence of names (weight 1 each) or
    ``{name: weight}``; names not given get weight 0.
    """
    if isinstance(active, str):
      active = {active: 1.0}
    elif not isinstance(active, Mapping):
      active = {n: 1.0 for n in active}
    unknown = sorted(set(active) - set(self.names))
    if unknown:
      raise ValueError(f"multi-adapter at '{self.path}': unknown adapters {unknown}; "
                       f"known: {self.names}.")
    if self.merged:
      raise ValueError(f"multi-adapter at '{self.path}' is merged; unmerge before set_active.")
    self.active = tuple((n, float(active[n])) for n in self.names if n in active)
    return self

  # -- weighted combination ------------------------------------------------------
  def delta_matrix(self) -> Array:
    deltas = [w * self.adapters[n].delta_matrix() for n, w in self.active]
    return sum(deltas[1:], deltas[0]) if deltas else jnp.zeros((self.view.fan_in, self.view.fan_out))

  def weighted_forward(self, x: Array, **kwargs) -> Array:
    y = self.base(x, **kwargs)
    for name, weight in self.active:
      member = self.adapters[name]
      low_rank = member.low_rank_output(member.adapter_input(x), **kwargs)
      y = y + (weight * low_rank).astype(y.dtype)
    return y

  # -- routing ---------------------------------------------------------------------
  def banks(self) -> tuple[Array, Array, tuple[float, ...]]:
    """(A bank (G, fan_in, r_max), B bank (G, r_max, fan_out), scales), zero-padded ranks."""
    members = [self.adapters[n] for n in self.names]
    rank = max(m.spec.rank for m in members)
    dtype = self.base.kernel.dtype
    pad = lambda t, axis: jnp.pad(t.astype(dtype), [(0, rank - t.shape[axis]) if i == axis else
                                                    (0, 0) for i in range(2)])
    a = jnp.stack([pad(m.lora_a[...], 1) for m in members])
    b = jnp.stack([pad(m.lora_b[...], 0) for m in members])
    return a, b, tuple(m.scale for m in members)

  def routed_forward(self, x: Array, adapter_ids: Array) -> Array:
    where = f"multi-adapter at '{self.path}'"
    if self.view.kind != "linear":
      raise ValueError(f"{where}: adapter_ids routing supports nnx.Linear layers; this one is "
                       f"{self.view.kind!r}. Use set_active for a weighted combination.")
    if any(m.spec.dropout > 0 for m in self.adapters.values()):
      raise ValueError(f"{where}: adapter_ids routing needs dropout=0 in every adapter.")
    x, kernel = fused_linear_base(self.base, x, self.path)
    a, b, scales = self.banks()
    impl = self.spec.implementation
    y = grouped_kernel.grouped_lora(
        x, kernel, a, b, jnp.asarray(adapter_ids), scales=scales,
        implementation=None if impl == "auto" else impl, interpret=self.spec.interpret)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def __call__(self, x: Array, adapter_ids: Array | None = None, **kwargs) -> Array:
    if adapter_ids is None and self.adapter_ids is not None:
      adapter_ids = self.adapter_ids[...]
    if adapter_ids is not None:
      if self.merged:
        raise ValueError(f"multi-adapter at '{self.path}' is merged; adapter_ids need the "
                         "unmerged adapters (lrj.unmerge).")
      if kwargs:
        raise TypeError(f"multi-adapter at '{self.path}': routed calls take no other call "
                        f"arguments; got {sorted(kwargs)}.")
      return self.routed_forward(x, adapter_ids)
    if self.merged:
      return self.base(x, **kwargs)
    return self.weighted_forward(x, **kwargs)


def multi_adapters(model: nnx.Module) -> list[MultiAdapter]:
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, MultiAdapter)]


def set_adapter_ids(model: nnx.Module, adapter_ids: Array | None) -> nnx.Module:
  """Route the next calls of every `MultiAdapter` in ``model`` by ``adapter_ids``.

  For models whose ``__call__`` does not pass ``adapter_ids`` down to the
  layers. The ids (a prefix of the layers' input row dims, e.g. one per
  sequence) are stored as an `AdapterIds` variable; None goes back to the
  weighted combination.
  """
  found = multi_adapters(model)
  if not found:
    raise ValueError("set_adapter_ids: the model has no multi-adapter layers "
                     "(attach them with lrj.attach(..., adapters={name: spec})).")
  for layer in found:
    layer.adapter_ids = None if adapter_ids is None else AdapterIds(jnp.asarray(adapter_ids))
  return model


def set_active(model: nnx.Module, active) -> nnx.Module:
  """`MultiAdapter.set_active` on every multi-adapter layer of ``model``."""
  for layer in multi_adapters(model):
    layer.set_active(active)
  return model

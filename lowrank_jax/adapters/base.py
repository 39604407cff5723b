"""The adapter contract: parameter types, specs, the adapter module protocol, the registry.

An adapter method is two things:

* an `AdapterSpec`: a frozen dataclass of hyperparameters, registered by name,
  whose ``build(base, rngs=..., calibration=..., path=...)`` wraps a base layer;
* an `Adapter`: an ``nnx.Module`` that holds the frozen base layer as
  ``self.base`` (its parameters stay ``nnx.Param``, so they are frozen by type,
  not copied) and its own trainable leaves as `AdapterParam`.

Training only the adapters is ``nnx.Optimizer(model, tx, wrt=AdapterParam)``
or ``nnx.split(model, AdapterParam, ...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import layers

Array = jax.Array


class AdapterParam(nnx.LoRAParam):
  """A trainable adapter parameter (a subclass of ``nnx.LoRAParam``)."""


class AdapterBuffer(nnx.Variable):
  """Frozen adapter state that is saved with the model but never trained.

  Examples: the shared random projections of VeRA, fixed sparsity masks.
  """


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Hyperparameters of one adapter method; subclasses are frozen dataclasses.

  Subclasses set the class attribute ``name`` (the registry key) and implement
  `build` and `num_params`.
  """

  name: ClassVar[str] = ""

  def build(self, base: nnx.Module, *, rngs: nnx.Rngs, calibration: Any = None,
            path: str = "") -> "Adapter":
    """Wrap ``base`` (a supported linear-like layer) in this method's adapter."""
    raise NotImplementedError

  def num_params(self, fan_in: int, fan_out: int) -> int:
    """Number of trainable parameters the adapter adds to a (fan_in, fan_out) layer."""
    raise NotImplementedError

  def shared_state(self, sites: Sequence[tuple[str, nnx.Module]], *, rngs: nnx.Rngs) -> Any:
    """State shared by all the layers this spec adapts in one `lrj.attach` call.

    `lrj.attach` calls this once per distinct spec (specs compare by value)
    with every ``(path, base module)`` the spec is about to wrap; when the
    result is not None it is passed to each ``build`` as ``shared=``. A spec
    holding cross-layer state (VeRA's random projections, Compacter's shared
    Kronecker factors) overrides this and accepts ``shared`` in `build`;
    sharing one `nnx.Variable` between adapter modules stores it once in the
    model state. The default shares nothing.
    """
    del sites, rngs
    return None

  def replace(self, **changes) -> "AdapterSpec":
    return dataclasses.replace(self, **changes)


class Adapter(nnx.Module):
  """Base class of adapter modules wrapping a frozen base layer.

  Protocol:
    ``__call__(x, **kwargs)``: the adapted forward; kwargs go to the base.
    `delta`: the weight update in the base kernel's layout (additive methods).
    `effective_kernel`: the kernel of the merged layer.
    `merge`: a plain base module whose kernel is `effective_kernel`.
    ``identity_at_init``: the adapted layer equals the base at initialization
      (read it on the instance: a class attribute, or a property where the
      hyperparameters decide it, as LoRA's uncompensated gradient inits do).
    ``additive``: the merged kernel is ``W0 + delta`` with delta independent of
      W0, so merging can be undone by subtraction (`lrj.unmerge`).
    `replaces_base_kernel`: building the adapter overwrote the base kernel.
    ``mergeable``: the adapted layer is a fixed linear map that one kernel can
      hold. False for input-dependent or nonlinear updates (mixtures routed per
      token, nonlinear bottlenecks): `merge`, `delta` and `effective_kernel` then raise.
  """

  identity_at_init: ClassVar[bool] = True
  additive: ClassVar[bool] = True
  mergeable: ClassVar[bool] = True

  @property
  def replaces_base_kernel(self) -> bool:
    """Whether building the adapter replaced the base kernel (e.g. by an SVD residual).

    Then ``self.base.kernel`` is no longer the original weight, so an update
    expressed against it only applies to a base holding the same residual.
    """
    return False

  def __init__(self, base: nnx.Module, spec: AdapterSpec, view: layers.LayerView,
               path: str = ""):
    self.base = base
    self.spec = spec
    self.view = view
    self.path = path
    self.merged = False

  # -- matrix-layout math that subclasses implement ----------------------------
  def delta_matrix(self) -> Array:
    """The (fan_in, fan_out) update such that W = W0 + delta (additive methods)."""
    raise NotImplementedError

  def effective_matrix(self) -> Array:
    """The (fan_in, fan_out) merged weight. Default: W0 + delta."""
    w0 = self.view.to_matrix(self.base.kernel[...])
    return w0.astype(jnp.float32) + self.delta_matrix().astype(jnp.float32)

  # -- protocol ------------------------------------------------------------------
  def delta(self) -> Array:
    """The weight update in the base kernel's layout."""
    return self.view.from_matrix(self.delta_matrix())

  def effective_kernel(self) -> Array:
    """The merged kernel in the base kernel's layout and dtype."""
    kernel = self.base.kernel
    return self.view.from_matrix(self.effective_matrix()).astype(kernel.dtype)

  def check_mergeable(self) -> None:
    """Raise the clear error of a non-mergeable adapter (see ``mergeable``)."""
    if not type(self).mergeable:
      raise ValueError(
          f"Adapter '{self.path}' ({self.spec.name}) is not mergeable: its update depends on "
          "the input, so no single kernel equals the adapted layer (see the method's docstring).")

  def merge(self) -> nnx.Module:
    """The base module with its kernel replaced by the merged kernel."""
    self.check_mergeable()
    if not self.merged:
      self.base.kernel[...] = self.effective_kernel()
    return self.base

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    """The adapted output when the adapter is not merged into the base."""
    raise NotImplementedError

  def __call__(self, x: Array, **kwargs) -> Array:
    if self.merged:
      return self.base(x, **kwargs)
    return self.adapter_forward(x, **kwargs)


# -- registry -------------------------------------------------------------------
_REGISTRY: dict[str, type[AdapterSpec]] = {}
SpecT = TypeVar("SpecT", bound=type[AdapterSpec])


def register(spec_cls: SpecT) -> SpecT:
  """Class decorator adding an `AdapterSpec` subclass to the registry by its name."""
  name = spec_cls.name
  if not name:
    raise ValueError(f"{spec_cls.__name__} must set a non-empty class attribute `name`.")
  if name in _REGISTRY and _REGISTRY[name] is not spec_cls:
    raise ValueError(f"Adapter name {name!r} is already registered by {_REGISTRY[name]}.")
  _REGISTRY[name] = spec_cls
  return spec_cls


def names() -> list[str]:
  """Names of all registered adapter methods, sorted."""
  return sorted(_REGISTRY)


def spec_class(name: str) -> type[AdapterSpec]:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown adapter method {name!r}; known methods: {names()}.")
  return _REGISTRY[name]


def get(name: str, **hyperparams) -> AdapterSpec:
  """The spec of the adapter method ``name`` with the given hyperparameters.

  Raises:
    ValueError: unknown method name (the known ones are listed) or unknown
      hyperparameter (the accepted ones are listed).
  """
  cls = spec_class(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(hyperparams) - fields)
  if unknown:
    raise ValueError(
        f"Unknown hyperparameters {unknown} for adapter {name!r}; accepted: {sorted(fields)}.")
  return cls(**hyperparams)


def factory(cls: type[AdapterSpec]) -> Callable[..., AdapterSpec]:
  """A keyword-only factory function ``lrj.adapters.<name>(**hp)`` for a spec class."""

  def make(**hyperparams) -> AdapterSpec:
    return get(cls.name, **hyperparams)

  make.__name__ = cls.name
  make.__doc__ = cls.__doc__
  return make


def sharding_for_factors(base: nnx.Module, view: layers.LayerView) -> dict[str, Any]:
  """Sharding metadata of (fan_in, r), (r, fan_out) factors and (fan_out,) vectors.

  Derived from the base kernel's ``out_sharding`` metadata when the kernel is a
  plain (in, out) matrix view: the first factor is sharded along the kernel's
  input axis, the second along its output axis. Empty dicts otherwise.
  """
  names = base.kernel.get_metadata().get("out_sharding")
  if not names or len(view.in_shape) != 1 or len(view.out_shape) != 1 or view.kind == "einsum":
    return {"a": {}, "b": {}, "out": {}}
  in_name, out_name = names[-2], names[-1]
  return {
      "a": {"out_sharding": (in_name, None), "eager_sharding": False},
      "b": {"out_sharding": (None, out_name), "eager_sharding": False},
      "out": {"out_sharding": (out_name,), "eager_sharding": False},
  }

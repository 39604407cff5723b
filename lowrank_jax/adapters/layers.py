"""Views of the supported base layers as 2-D linear maps (fan_in, fan_out).

Adapter math is written once for a matrix ``W`` of shape (fan_in, fan_out) with
``y = x W`` (the layout of ``nnx.Linear.kernel``). A `LayerView` maps each
supported NNX base layer onto that picture:

* ``nnx.Linear``: kernel (in, out); fan_in = in, fan_out = out.
* ``nnx.LinearGeneral``: kernel ``in_shape + out_shape`` (contracted input
  axes first, no ``batch_axis``); fan_in = prod(in_shape), fan_out =
  prod(out_shape), the matrix is the row-major reshape.
* ``nnx.Einsum``: the kernel labels that also occur in the input and not in
  the output are contracted (fan_in, in kernel order); the kernel labels that
  occur in the output are fan_out (in kernel order). Kernel labels shared by
  input and output (per-head batch axes) are not supported.
* ``nnx.Conv`` (feature_group_count = 1): kernel ``window + (in, out)``; fan_in
  = prod(window) * in (the row-major reshape of the leading axes), fan_out =
  out. A low-rank update ``A B`` becomes a convolution with ``A`` reshaped to
  ``window + (in, r)`` followed by a 1x1 convolution (a dense map on channels)
  with ``B``, as in PEFT's LoRA for Conv layers.

Every view offers the unmerged factor path ``project_in(x, a)`` (x contracted
with an (fan_in, r) factor, the base layer's own contraction) and
``project_out(z, b)`` (the rank axis mapped onto the output features), so that
``project_out(project_in(x, a), b) == base_without_bias(x) with kernel a @ b``
without forming ``a @ b``.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class UnsupportedLayerError(TypeError):
  """Raised when an adapter is attached to a module that is not linear-like."""


@dataclasses.dataclass(frozen=True)
class LayerView:
  """How a base layer's kernel and contraction read as a (fan_in, fan_out) matrix.

  Attributes:
    kind: 'linear', 'linear_general', 'einsum' or 'conv'.
    kernel_shape: shape of the base kernel.
    in_shape: kernel dims contracted with the input (fan_in = prod).
    out_shape: kernel dims that appear in the output (fan_out = prod).
    perm: permutation taking the kernel to ``in_dims + out_dims`` order
      (identity except for some einsums).
    einsum: for 'einsum', (input labels, kernel labels, output labels) with
      '...' kept as one token; None otherwise.
  """

  kind: str
  kernel_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  perm: tuple[int, ...]
  einsum: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None

  @property
  def fan_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def fan_out(self) -> int:
    return math.prod(self.out_shape)

  # -- kernel <-> matrix --------------------------------------------------------
  def to_matrix(self, kernel: Array) -> Array:
    """Base kernel -> (fan_in, fan_out) matrix."""
    return jnp.transpose(kernel, self.perm).reshape(self.fan_in, self.fan_out)

  def from_matrix(self, matrix: Array) -> Array:
    """(fan_in, fan_out) matrix -> array in the base kernel's layout."""
    permuted = matrix.reshape(self.in_shape + self.out_shape)
    return jnp.transpose(permuted, _inverse(self.perm))

  # -- unmerged factor path -----------------------------------------------------
  def project_in(self, base: nnx.Module, x: Array, a: Array, **kwargs) -> Array:
    """Contract the input with an (fan_in, r) factor as the base layer would.

    Returns the base layer's output with its feature dims replaced by one rank
    axis: (..., r) for linear/linear_general/conv, and for einsum the output
    labels of the input followed by r.
    """
    rank = a.shape[-1]
    if self.kind == "einsum":
      lhs, rhs, out = self.einsum
      in_labels = tuple(rhs[i] for i in self.perm[: len(self.in_shape)])
      z_labels = tuple(t for t in out if t in lhs) + (_RANK_LABEL,)
      kernel = a.reshape(self.in_shape + (rank,))
      x, kernel = base.promote_dtype((x, kernel), dtype=base.dtype)
      spec = f"{''.join(lhs)},{''.join(in_labels)}{_RANK_LABEL}->{''.join(z_labels)}"
      return jnp.einsum(spec, x, kernel, precision=base.precision)
    kernel = a.reshape(self.kernel_shape[: -len(self.out_shape)] + (rank,))
    return _call_with_kernel(base, x, kernel, (rank,), **kwargs)

  def project_out(self, z: Array, b: Array) -> Array:
    """Map the rank axis of ``z`` through an (r, fan_out) factor to the output."""
    rank = b.shape[0]
    if self.kind == "einsum":
      lhs, _, out = self.einsum
      z_labels = tuple(t for t in out if t in lhs) + (_RANK_LABEL,)
      out_labels = self.out_labels
      spec = f"{''.join(z_labels)},{_RANK_LABEL}{''.join(out_labels)}->{''.join(out)}"
      return jnp.einsum(spec, z, b.reshape((rank,) + self.out_shape).astype(z.dtype))
    return jnp.tensordot(z, b.reshape((rank,) + self.out_shape).astype(z.dtype), axes=1)

  def broadcast_out(self, v: Array, ndim: int) -> Array:
    """Reshape a (fan_out,) vector to broadcast against an output of rank ``ndim``."""
    if self.kind != "einsum":
      return v.reshape(self.out_shape)
    _, _, out = self.einsum
    out_labels = self.out_labels
    # Expand '...' to the number of dims it stands for in this output.
    n_ellipsis = ndim - (len(out) - out.count("..."))
    expanded = []
    for token in out:
      expanded.extend([None] * n_ellipsis if token == "..." else [token])
    sizes = dict(zip(out_labels, self.out_shape))
    shape = [sizes.get(t, 1) for t in expanded]
    order = [t for t in expanded if t in sizes]
    v = v.reshape(self.out_shape)
    v = jnp.transpose(v, [out_labels.index(t) for t in order])
    return v.reshape(shape)

  @property
  def out_labels(self) -> tuple[str, ...]:
    kernel_labels = self.einsum[1]
    return tuple(kernel_labels[i] for i in self.perm[len(self.in_shape):])

  def call_without_bias(self, base: nnx.Module, x: Array, kernel: Array | None = None,
                        **kwargs) -> Array:
    """The base layer's output without bias, optionally with another kernel."""
    kernel = base.kernel[...] if kernel is None else kernel
    if self.kind == "einsum":
      lhs, rhs, out = self.einsum
      x, kernel = base.promote_dtype((x, kernel), dtype=base.dtype)
      spec = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
      return jnp.einsum(spec, x, kernel, precision=base.precision)
    return _call_with_kernel(base, x, kernel, self.out_shape, **kwargs)

  def bias(self, base: nnx.Module, ndim: int) -> Array | None:
    """The base bias broadcastable against an output of rank ``ndim`` (or None)."""
    if getattr(base, "bias", None) is None:
      return None
    bias = base.bias[...]
    if self.kind == "einsum":
      return self.broadcast_out(bias.reshape(-1), ndim) if bias.size == self.fan_out else bias
    return bias.reshape(self.out_shape)


_RANK_LABEL = "\u03c1"  # a label no user einsum string uses


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
  inverse = [0] * len(perm)
  for i, p in enumerate(perm):
    inverse[p] = i
  return tuple(inverse)


def _call_with_kernel(base: nnx.Module, x: Array, kernel: Array, out_features,
                      **kwargs) -> Array:
  """Run ``type(base).__call__`` with another kernel and no bias or mask.

  The base class's own forward (padding modes, dtype promotion, precision,
  dot_general overrides) is reused on a stand-in object that carries the base
  layer's static attributes, so the factor path contracts exactly as the base
  layer does.
  """
  standin = types.SimpleNamespace(**vars(base))
  standin.kernel = kernel
  standin.bias = None
  standin.use_bias = False
  standin.mask = None
  standin.kernel_shape = kernel.shape
  if isinstance(base, nnx.Conv):
    standin.out_features = out_features[0]
  else:
    standin.out_features = out_features[0] if isinstance(base, nnx.Linear) else tuple(out_features)
  return type(base).__call__(standin, x, **kwargs)


def _parse_einsum(einsum_str: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  def tokens(s: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(s):
      if s.startswith("...", i):
        out.append("...")
        i += 3
      else:
        out.append(s[i])
        i += 1
    return tuple(out)

  s = einsum_str.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise UnsupportedLayerError(
        f"Einsum string {einsum_str!r} must have two operands and an explicit '->'.")
  operands, out = s.split("->")
  lhs, rhs = operands.split(",")
  return tokens(lhs), tokens(rhs), tokens(out)


def view_of(module: Any, path: str = "") -> LayerView:
  """The `LayerView` of a supported base layer; raises for anything else.

  Args:
    module: an nnx.Linear, nnx.LinearGeneral, nnx.Einsum or nnx.Conv.
    path: the module's path, used in error messages.
  """
  where = f" at '{path}'" if path else ""
  if isinstance(module, nnx.Linear):
    shape = tuple(module.kernel.shape)
    return LayerView("linear", shape, shape[:1], shape[1:], (0, 1))
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise UnsupportedLayerError(
          f"nnx.LinearGeneral{where} has batch_axis={dict(module.batch_axis)}; adapters "
          "support LinearGeneral layers without batch axes.")
    shape = tuple(module.kernel.shape)
    n_out = len(module.out_features)
    return LayerView("linear_general", shape, shape[:-n_out], shape[-n_out:],
                     tuple(range(len(shape))))
  if isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      raise UnsupportedLayerError(
          f"nnx.Einsum{where} has no einsum_str at construction; adapters need it.")
    lhs, rhs, out = _parse_einsum(module.einsum_str)
    shape = tuple(module.kernel.shape)
    if "..." in rhs or len(rhs) != len(shape):
      raise UnsupportedLayerError(f"Einsum kernel spec {''.join(rhs)!r}{where} must name every axis.")
    contracted = [i for i, t in enumerate(rhs) if t in lhs and t not in out]
    produced = [i for i, t in enumerate(rhs) if t in out and t not in lhs]
    shared = [t for t in rhs if t in lhs and t in out]
    if shared or len(contracted) + len(produced) != len(rhs) or not contracted or not produced:
      raise UnsupportedLayerError(
          f"Einsum {module.einsum_str!r}{where}: every kernel axis must be either contracted "
          f"with the input or an output feature (found shared axes {shared}); per-head batch "
          "axes in the kernel are not supported.")
    perm = tuple(contracted + produced)
    return LayerView("einsum", shape, tuple(shape[i] for i in contracted),
                     tuple(shape[i] for i in produced), perm, einsum=(lhs, rhs, out))
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      raise UnsupportedLayerError(
          f"nnx.Conv{where} has feature_group_count={module.feature_group_count}; adapters "
          "support ungrouped convolutions.")
    shape = tuple(module.kernel.shape)
    return LayerView("conv", shape, shape[:-1], shape[-1:], tuple(range(len(shape))))
  raise UnsupportedLayerError(
      f"Module{where} is a {type(module).__name__}, which is not linear-like; adapters attach "
      "to nnx.Linear, nnx.LinearGeneral, nnx.Einsum and nnx.Conv.")


SUPPORTED_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


def check_positive_int(method: str, name: str, value: Any, allow_none: bool = False) -> None:
  """Raise a clear error unless ``value`` is a positive int (or None if allowed)."""
  if allow_none and value is None:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    allowed = "a positive integer or None" if allow_none else "a positive integer"
    raise ValueError(f"{method}: {name} must be {allowed}, got {value!r}.")


def check_rank_fits(method: str, path: str, rank: int, limit: int, what: str,
                    why: str = "") -> None:
  """Raise unless ``rank <= limit``; the error names the method, the layer path and the bound."""
  if rank > limit:
    raise ValueError(f"{method} at '{path}': rank={rank} exceeds {what} = {limit}{why}.")


def check_rank_fits_layer(method: str, path: str, rank: int, view: LayerView,
                          why: str = "") -> None:
  """`check_rank_fits` against ``min(fan_in, fan_out)`` of ``view``."""
  check_rank_fits(method, path, rank, min(view.fan_in, view.fan_out),
                  f"min(fan_in, fan_out) = min({view.fan_in}, {view.fan_out})", why)

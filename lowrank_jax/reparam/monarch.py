"""Monarch and block tensor-train (BTT) dense replacements.

Dao, Chen, Sohoni et al., "Monarch: Expressive Structured Matrices for
Efficient and Accurate Training" (2022); Qiu, Potapczynski, Finzi, Goldblum &
Wilson, "Compute Better Spent: Replacing Dense Layers with Structured
Matrices" (2024) for BTT. In the (fan_in, fan_out) layout, with fan_in = k p
and fan_out = l q, the input index is (a, i) (a < k, i < p) and the output
index is (c, b) (c < l, b < q), and

    W[(a, i), (c, b)] = sum_rho core_in[a, b, i, rho] * core_out[b, c, a, rho].

The forward is two batched block products with a transpose between them
(``x -> (k, p) -> core_in -> (k, q, rho) -> transpose -> core_out -> (l, q)``):
``k q r (p + l)`` parameters and multiply-adds per row instead of
``fan_in fan_out``. rank r = 1 is Monarch, ``M = P L P^T R`` with block-diagonal
L and R (up to the fixed input/output permutations); r > 1 is the two-core BTT.

Projection of a dense W onto this class (`project`): for every block pair
(a, b) the (p, l) slice ``W[(a, :), (:, b)]`` is a sum of r outer products
``core_in[a, b, :, rho] core_out[b, :, a, rho]``, so the best approximation
is the rank-r truncated SVD of each slice (the Monarch paper's projection);
it recovers a matrix of the class exactly.

Init (``init``): 'project' projects the base layer's init onto the class;
'random' draws each core with the muP / spectral-condition variance
1 / (its contracted size): core_in ~ N(0, 1/p), core_out ~ N(0, 1/(k r)),
as in "Compute Better Spent" (per-core learning-rate multipliers are in
`lowrank_jax.reparam.scaling`). The base kernel is zeroed (the weight is
replaced). Linear layers use the factored forward; other layer kinds form
the kernel and run the base layer's contraction.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers

Array = jax.Array
INITS = ("project", "random")


def default_blocks(n: int) -> int:
  """The largest divisor of n that is <= sqrt(n)."""
  return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def dense_from_cores(core_in: Array, core_out: Array) -> Array:
  """The (k p, l q) matrix of the cores core_in (k, q, p, r), core_out (q, l, k, r)."""
  k, q, p, _ = core_in.shape
  l = core_out.shape[1]
  w = jnp.einsum("abir,bcar->aicb", core_in.astype(jnp.float32), core_out.astype(jnp.float32))
  return w.reshape(k * p, l * q)


def factored_matmul(x: Array, core_in: Array, core_out: Array) -> Array:
  """``x @ dense_from_cores(core_in, core_out)`` without forming the matrix."""
  k, q, p, _ = core_in.shape
  l = core_out.shape[1]
  z = jnp.einsum("...ai,abir->...bar", x.reshape(x.shape[:-1] + (k, p)), core_in)
  y = jnp.einsum("...bar,bcar->...cb", z, core_out)
  return y.reshape(x.shape[:-1] + (l * q,))


def project(w: Array, k: int, q: int, rank: int) -> tuple[Array, Array]:
  """The cores of the best approximation of w (k p, l q) by this class (rank-r SVD per slice)."""
  n_in, n_out = w.shape
  p, l = n_in // k, n_out // q
  slices = w.astype(jnp.float32).reshape(k, p, l, q).transpose(0, 3, 1, 2)  # (a, b, i, c)
  u, s, vt = jnp.linalg.svd(slices, full_matrices=False)
  root = jnp.sqrt(s[..., :rank])
  core_in = u[..., :rank] * root[..., None, :]                          # (a, b, i, r)
  core_out = jnp.swapaxes(vt[..., :rank, :], -1, -2) * root[..., None, :]  # (a, b, c, r)
  return core_in, core_out.transpose(1, 2, 0, 3)                         # (b, c, a, r)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class MonarchSpec(adapter_base.AdapterSpec):
  """Monarch hyperparameters (BTT adds ``rank``).

  Attributes:
    in_blocks: k, must divide fan_in; None: the largest divisor <= sqrt(fan_in).
    out_blocks: q, must divide fan_out; None: the largest divisor <= sqrt(fan_out).
    init: 'project' (nearest structured matrix to the base init) or 'random' (muP scaling).
  """

  name = "monarch"
  in_blocks: int | None = None
  out_blocks: int | None = None
  init: str = "project"

  @property
  def core_rank(self) -> int:
    return 1

  def __post_init__(self):
    for field in ("in_blocks", "out_blocks"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{self.name}: {field} must be an integer >= 1 or None, got {value!r}.")
    if self.init not in INITS:
      raise ValueError(f"{self.name}: init must be one of {INITS}, got {self.init!r}.")

  def layout(self, fan_in: int, fan_out: int, path: str = "") -> tuple[int, int, int, int]:
    """(k, p, l, q) with fan_in = k p, fan_out = l q."""
    k = self.in_blocks or default_blocks(fan_in)
    q = self.out_blocks or default_blocks(fan_out)
    for blocks, n, side in ((k, fan_in, "fan_in"), (q, fan_out, "fan_out")):
      if n % blocks:
        raise ValueError(f"{self.name} at '{path}': {blocks} blocks do not divide {side}={n}.")
    return k, fan_in // k, fan_out // q, q

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    self.layout(view.fan_in, view.fan_out, path)
    return Monarch(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    k, p, l, q = self.layout(fan_in, fan_out)
    return k * q * self.core_rank * (p + l)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class BTTSpec(MonarchSpec):
  """Two-core block tensor-train: Monarch's options plus the BTT rank r >= 1."""

  name = "btt"
  rank: int = 2

  @property
  def core_rank(self) -> int:
    return self.rank

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"btt: rank must be an integer >= 1, got {self.rank!r}.")


class Monarch(adapter_base.Adapter):
  """Leaves: ``core_in`` (k, q, p, r) and ``core_out`` (q, l, k, r), trainable."""

  identity_at_init = False
  additive = True

  def __init__(self, base: nnx.Module, spec: MonarchSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    k, p, l, q = spec.layout(view.fan_in, view.fan_out, path)
    r = spec.core_rank
    if spec.init == "project":
      w0 = view.to_matrix(base.kernel[...])
      core_in, core_out = project(w0, k, q, min(r, p, l))
      pad = r - core_in.shape[-1]  # rank above min(p, l) adds zero components
      core_in = jnp.pad(core_in, ((0, 0),) * 3 + ((0, pad),))
      core_out = jnp.pad(core_out, ((0, 0),) * 3 + ((0, pad),))
    else:
      key_in, key_out = jax.random.split(rngs.params())
      core_in = jax.random.normal(key_in, (k, q, p, r)) / math.sqrt(p)
      core_out = jax.random.normal(key_out, (q, l, k, r)) / math.sqrt(k * r)
    dtype = base.kernel.dtype
    base.kernel[...] = jnp.zeros_like(base.kernel[...])
    self.core_in = adapter_base.AdapterParam(core_in.astype(dtype))
    self.core_out = adapter_base.AdapterParam(core_out.astype(dtype))

  def delta_matrix(self) -> Array:
    return dense_from_cores(self.core_in[...], self.core_out[...])

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    if self.view.kind == "linear" and not kwargs:
      x, core_in, core_out = self.base.promote_dtype(
          (x, self.core_in[...], self.core_out[...]), dtype=self.base.dtype)
      y = factored_matmul(x, core_in, core_out)
    else:
      y = self.view.call_without_bias(self.base, x, kernel=self.effective_kernel(), **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

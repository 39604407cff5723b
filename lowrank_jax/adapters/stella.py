"""StelLA: a three-factor adapter whose subspaces live on Stiefel manifolds.

Li et al., "StelLA: Subspace Learning in Low-rank Adaptation using Stiefel
Manifold" (NeurIPS 2025). In the paper's (out, in) layout
``dW = s U S V^T`` with ``U`` (out, r) and ``V`` (in, r) orthonormal. In our
(fan_in, fan_out) layout ``dW = W^T``:

    y = x W0 + s ((x V) S) U^T,   dW = s V S U^T

with leaves ``stella_v`` (fan_in, r) and ``stella_u`` (fan_out, r), both with
orthonormal columns (``X^T X = I``), and ``stella_s`` (r, r), the transpose
of the paper's S (or (r,) with ``diag_s``). U and V stay on the manifold only
when trained with `lowrank_jax.optim.riemannian.stiefel`, which selects them
by these names.

Initialization: U and V random orthonormal ('random') or the top/bottom
singular vectors of W0 ('svd_major'/'svd_minor'). S = I with W0 unchanged is
the official code (SonyResearch/stella), so the layer starts at
``W0 + s V U^T`` and not at the base function (``identity_at_init`` is False).
Options: ``s_init='zero'`` starts at the base function with S = 0 (U and V
then get no gradient on the first step); ``compensate=True`` keeps S = I and
stores ``W0 - s V U^T`` in the frozen base, which also starts at the base
function but makes the adapter learn ``dW* + s V0 U0^T``, of rank up to 2r
(measured: a rank-4 teacher update is then fit far worse at rank 4).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.adapters.lora import lora_scale

Array = jax.Array

INITS = ("random", "svd_major", "svd_minor")
S_INITS = ("identity", "zero")


@functools.partial(jax.jit, static_argnums=(0, 3))
def stella_factors(init: str, key: Array, w0: Array, rank: int) -> tuple[Array, Array]:
  """(V (fan_in, r), U (fan_out, r)) with orthonormal columns."""
  fan_in, fan_out = w0.shape
  if init == "random":
    k_v, k_u = jax.random.split(key)
    v = linalg.orthonormalize(jax.random.normal(k_v, (fan_in, rank), jnp.float32))
    u = linalg.orthonormalize(jax.random.normal(k_u, (fan_out, rank), jnp.float32))
    return v, u
  left, _, right_t = linalg.svd_topk(w0.astype(jnp.float32), rank, largest=init == "svd_major")
  return left, right_t.T


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class StellaSpec(adapter_base.AdapterSpec):
  """StelLA hyperparameters.

  Attributes:
    rank: r, 1 <= r <= min(fan_in, fan_out).
    alpha: scaling numerator (``s = alpha / r``); None means alpha = r.
    rslora: ``s = alpha / sqrt(r)``.
    init: 'random' (orthonormal U, V), 'svd_major' or 'svd_minor' (singular
      vectors of W0).
    s_init: 'identity' (S = I, official) or 'zero' (S = 0: the layer starts at
      the base function).
    diag_s: S is a trainable diagonal (r,) instead of a full (r, r) matrix.
    compensate: with S = I, replace the frozen W0 by ``W0 - s V U^T`` so the
      adapted layer starts at the base function (False: the official start).
    dropout: dropout rate on the adapter input.
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "stella"
  rank: int = 8
  alpha: float | None = None
  rslora: bool = False
  init: str = "random"
  s_init: str = "identity"
  diag_s: bool = False
  compensate: bool = False
  dropout: float = 0.0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int("stella", "rank", self.rank)
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"stella: alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}.")
    if self.init not in INITS:
      raise ValueError(f"stella: unknown init {self.init!r}; known: {list(INITS)}.")
    if self.s_init not in S_INITS:
      raise ValueError(f"stella: unknown s_init {self.s_init!r}; known: {list(S_INITS)}.")
    if self.compensate and self.s_init == "zero":
      raise ValueError("stella: compensate=True needs s_init='identity' (with S = 0 there is "
                       "nothing to compensate).")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"stella: dropout must be in [0, 1), got {self.dropout!r}.")

  @property
  def scale(self) -> float:
    return lora_scale(self.rank if self.alpha is None else self.alpha, self.rank, self.rslora)

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    layers.check_rank_fits_layer("stella", path, self.rank, view,
                                 why="; U and V need orthonormal columns")
    return Stella(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out) + (self.rank if self.diag_s else self.rank ** 2)


class Stella(adapter_base.Adapter):
  """A StelLA adapter (see the module docstring); by default it starts at W0 + s V U^T.

  Leaves: ``stella_v`` (fan_in, r), ``stella_s`` (r, r) or (r,), ``stella_u``
  (fan_out, r).
  """

  identity_at_init = False

  def __init__(self, base: nnx.Module, spec: StellaSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    v, u = stella_factors(spec.init, rngs.params(), w0, spec.rank)
    s = jnp.ones((spec.rank,)) if spec.diag_s else jnp.eye(spec.rank)
    if spec.s_init == "zero":
      s = jnp.zeros_like(s)
    dtype = spec.param_dtype or base.kernel.dtype
    sharding = adapter_base.sharding_for_factors(base, view)
    self.stella_v = adapter_base.AdapterParam(v.astype(dtype), **sharding["a"])
    self.stella_s = adapter_base.AdapterParam(s.astype(dtype))
    self.stella_u = adapter_base.AdapterParam(u.astype(dtype))
    self.dropout = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None
    if spec.compensate:
      base.kernel[...] = view.from_matrix(w0 - self.delta_matrix()).astype(base.kernel.dtype)

  def core(self) -> Array:
    """S as an (r, r) matrix."""
    s = self.stella_s[...]
    return jnp.diag(s) if self.spec.diag_s else s

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.base(x, **kwargs)
    x_in = self.dropout(x) if self.dropout is not None else x
    z = self.view.project_in(self.base, x_in, self.stella_v[...], **kwargs)
    z = jnp.tensordot(self.spec.scale * z, self.core().astype(z.dtype), axes=1)
    return y + self.view.project_out(z, self.stella_u[...].T).astype(y.dtype)

  def delta_matrix(self) -> Array:
    v = self.stella_v[...].astype(jnp.float32)
    u = self.stella_u[...].astype(jnp.float32)
    return self.spec.scale * (v @ self.core().astype(jnp.float32) @ u.T)

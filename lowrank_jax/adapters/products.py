"""Product adapters: scaled shared projections, Hadamard and Kronecker products.

All math is in the (fan_in, fan_out) layout of `LayerView` (``y = x W``). PEFT
stores ``nn.Linear.weight`` as (out, in), so each PEFT matrix below is the
transpose of ours; the per-method docstrings give the exact correspondence
(checked numerically in tests/adapters/peft_zoo_parity_test.py).

* `VeRASpec` (VeRA): ``dW = A diag(d) B diag(b)`` with A, B frozen random
  matrices shared by every adapted layer of one `lrj.attach` call.
* `LoHaSpec` (LoHa / FedPara): ``dW = s (A1 B1) ⊙ (A2 B2)``, rank <= r^2.
* `LoKrSpec` (LoKr): ``dW = s C ⊗ M`` with M low-rank or full.
* `CompacterSpec` (Compacter's LPHM): ``dW = sum_i A_i ⊗ (s_i t_i^T)`` with
  the A_i shared across layers.
* `SoKASpec` (SoKA): ``dW = sum_{i<=k} A_i ⊗ B_i`` initialized by a
  Kronecker-product SVD of W0, k by energy.

The Kronecker adapters share one module (`KroneckerSumAdapter`): the update is
``s * sum_i a_i ⊗ b_i`` (`linalg.kron_sum`) and the forward applies it as a
Kronecker matvec (`linalg.kron_sum_matmul`) on nnx.Linear layers, and as the
(fan_in, fan_out) update kernel (never ``W0 + dW``) on the other layer kinds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers

Array = jax.Array


# -- shared helpers ---------------------------------------------------------------
def uniform_fan_in(key: Array, shape: Sequence[int], fan_in: int, gain: float = 1.0) -> Array:
  """``U(-gain / sqrt(fan_in), gain / sqrt(fan_in))`` in float32.

  ``gain=1`` is torch's ``kaiming_uniform_(a=sqrt(5))`` (PEFT's default for
  LoHa, LoKr, HRA factors); ``gain=sqrt(6)`` is PEFT's VeRA projection init.
  """
  bound = gain / math.sqrt(fan_in)
  return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound)


def param_dtype(spec: Any, base: nnx.Module):
  """The adapter parameter dtype: ``spec.param_dtype`` or the base kernel's."""
  return spec.param_dtype or base.kernel.dtype


def _where(path: str) -> str:
  return f" at '{path}'" if path else ""


# -- VeRA --------------------------------------------------------------------------
class VeRABasis(NamedTuple):
  """VeRA's frozen random projections, one pair per attach call.

  ``a`` (in_dim, r) and ``b`` (r, out_dim); a layer with fan_in <= in_dim and
  fan_out <= out_dim uses the leading rows of ``a`` and columns of ``b``.
  """

  a: adapter_base.AdapterBuffer
  b: adapter_base.AdapterBuffer


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class VeRASpec(adapter_base.AdapterSpec):
  """VeRA (Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix
  Adaptation", 2024).

      y = x W0 + ((dropout(x) A[:fan_in]) * d) B[:, :fan_out] * b

  i.e. ``dW = A diag(d) B diag(b)`` with A (in_dim, r), B (r, out_dim) frozen
  random matrices shared by all adapted layers, and only ``d`` (r,) and ``b``
  (fan_out,) trained; ``b = 0`` at init (identity), ``d = d_initial``.

  Sharing: `lrj.attach` builds one `VeRABasis` per distinct spec and call
  (`shared_state`), sized to the largest fan_in / fan_out among the layers
  (as PEFT) or to ``basis_shape``; every adapter references the same two
  `AdapterBuffer` variables, so the model state holds one copy. A spec built
  directly (``spec.build(layer)``) makes a basis for that layer alone. The
  projections are drawn from ``jax.random.key(projection_seed)`` (PEFT's
  ``projection_prng_key``) so they can be regenerated from the spec.

  PEFT layout: ``vera_A`` (r, in) = ``a.T``, ``vera_B`` (out, r) = ``b.T``,
  ``vera_lambda_d`` = d, ``vera_lambda_b`` = b; both inits draw
  ``U(+-sqrt(6 / fan))`` (fan = in_dim for A, r for B) but from different
  random generators, so the projections themselves differ.

  Attributes:
    rank: r, the width of the shared projections (PEFT default 256).
    d_initial: initial value of every entry of ``d``.
    projection_seed: seed of the shared projections.
    basis_shape: (in_dim, out_dim) of the shared projections; None uses the
      largest dims of the layers adapted in the same attach call. A layer
      larger than the basis is an error.
    dropout: dropout rate on the adapter input, in [0, 1).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "vera"
  rank: int = 256
  d_initial: float = 0.1
  projection_seed: int = 0
  basis_shape: tuple[int, int] | None = None
  dropout: float = 0.0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout!r}.")
    if self.basis_shape is not None:
      if len(self.basis_shape) != 2:
        raise ValueError(f"{self.name}: basis_shape must be (in_dim, out_dim), got {self.basis_shape!r}.")
      for dim in self.basis_shape:
        layers.check_positive_int(self.name, "basis_shape entries", dim)

  def shared_state(self, sites, *, rngs) -> VeRABasis:
    del rngs  # the basis comes from projection_seed, so it is reproducible
    views = [layers.view_of(module, path) for path, module in sites]
    if self.basis_shape is None:
      in_dim, out_dim = max(v.fan_in for v in views), max(v.fan_out for v in views)
    else:
      in_dim, out_dim = self.basis_shape
    dtype = param_dtype(self, sites[0][1])
    key_a, key_b = jax.random.split(jax.random.key(self.projection_seed))
    a = uniform_fan_in(key_a, (in_dim, self.rank), in_dim, gain=math.sqrt(6.0))
    b = uniform_fan_in(key_b, (self.rank, out_dim), self.rank, gain=math.sqrt(6.0))
    return VeRABasis(adapter_base.AdapterBuffer(a.astype(dtype)),
                     adapter_base.AdapterBuffer(b.astype(dtype)))

  def build(self, base, *, rngs, calibration=None, path="", shared: VeRABasis | None = None):
    del calibration
    view = layers.view_of(base, path)
    basis = self.shared_state([(path, base)], rngs=rngs) if shared is None else shared
    in_dim, rank = basis.a.shape
    out_dim = basis.b.shape[1]
    if rank != self.rank or basis.b.shape[0] != self.rank:
      raise ValueError(f"vera{_where(path)}: the shared basis has rank {rank}, the spec {self.rank}.")
    if view.fan_in > in_dim or view.fan_out > out_dim:
      raise ValueError(
          f"vera{_where(path)}: the shared basis covers (fan_in, fan_out) up to ({in_dim}, "
          f"{out_dim}) but the layer is ({view.fan_in}, {view.fan_out}); set basis_shape to at "
          "least the largest layer dims, or None to size it from the adapted layers.")
    return VeRA(base, self, view, path, basis=basis, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank + fan_out


class VeRA(adapter_base.Adapter):
  """A VeRA adapter (see `VeRASpec`). Leaves: ``vera_d`` (r,), ``vera_b``
  (fan_out,) trainable; ``vera_a``, ``vera_bmat`` the shared frozen basis."""

  def __init__(self, base, spec: VeRASpec, view, path="", *, basis: VeRABasis, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = param_dtype(spec, base)
    sharding = adapter_base.sharding_for_factors(base, view)
    self.vera_a = basis.a
    self.vera_bmat = basis.b
    self.vera_d = adapter_base.AdapterParam(jnp.full((spec.rank,), spec.d_initial, dtype))
    self.vera_b = adapter_base.AdapterParam(jnp.zeros((view.fan_out,), dtype), **sharding["out"])
    self.dropout = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None

  def projections(self) -> tuple[Array, Array]:
    """The layer's slices A[:fan_in] (fan_in, r) and B[:, :fan_out] (r, fan_out)."""
    return self.vera_a[...][: self.view.fan_in], self.vera_bmat[...][:, : self.view.fan_out]

  def adapter_forward(self, x, **kwargs):
    y = self.base(x, **kwargs)
    x_adapter = self.dropout(x) if self.dropout is not None else x
    a, b = self.projections()
    z = self.view.project_in(self.base, x_adapter, a, **kwargs)
    z = z * self.vera_d[...].astype(z.dtype)
    out = self.view.project_out(z, b)
    out = out * self.view.broadcast_out(self.vera_b[...], out.ndim).astype(out.dtype)
    return y + out.astype(y.dtype)

  def delta_matrix(self):
    a, b = self.projections()
    d = self.vera_d[...].astype(jnp.float32)
    scale_out = self.vera_b[...].astype(jnp.float32)
    return (a.astype(jnp.float32) * d[None, :]) @ (b.astype(jnp.float32) * scale_out[None, :])


# -- LoHa / FedPara ---------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoHaSpec(adapter_base.AdapterSpec):
  """LoHa (LyCORIS; PEFT's LoHa), the adapter form of FedPara (Hyeon-Woo, Ye-Bin
  & Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
  Learning", 2022):

      dW = s * (A1 B1) ⊙ (A2 B2),   A_k (fan_in, r), B_k (r, fan_out),  s = alpha / r

  rank(dW) <= r^2 with 2 r (fan_in + fan_out) parameters. The forward never
  forms dW: with the face-splitting identity ``(A1 B1) ⊙ (A2 B2) = K_in K_out``,
  ``K_in[:, (i, j)] = A1[:, i] * A2[:, j]`` (fan_in, r^2) and ``K_out[(i, j)] =
  B1[i] * B2[j]`` (r^2, fan_out), it runs the factor path ``(x K_in) K_out``
  through the base layer's own contraction (so Conv layers work too).

  Init as PEFT's ``init_weights=True``: A1 ~ U(+-1/sqrt(fan_in)), B1, B2 ~
  U(+-1/sqrt(r)), A2 = 0 (identity at init). PEFT layout (out, in):
  ``hada_w1_a = B1.T``, ``hada_w1_b = A1.T``, ``hada_w2_a = B2.T``,
  ``hada_w2_b = A2.T``. Not implemented: PEFT's rank/module dropout and the CP
  (Tucker) decomposition of conv kernels (``use_effective_conv2d``); Conv
  kernels are adapted as the flattened (prod(window) * in, out) matrix.

  Attributes:
    rank: r >= 1.
    alpha: scaling numerator; None means alpha = r (scale 1, PEFT's default).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "loha"
  rank: int = 8
  alpha: float | None = None
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"{self.name}: alpha must be > 0 or None, got {self.alpha!r}.")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    return LoHa(base, self, layers.view_of(base, path), path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return 2 * self.rank * (fan_in + fan_out)


def hadamard_factors(a1: Array, b1: Array, a2: Array, b2: Array) -> tuple[Array, Array]:
  """``(K_in, K_out)`` with ``K_in @ K_out == (a1 @ b1) * (a2 @ b2)``; rank r1 r2."""
  k_in = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
  k_out = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
  return k_in, k_out


class LoHa(adapter_base.Adapter):
  """A LoHa adapter (see `LoHaSpec`). Leaves ``loha_a1``, ``loha_a2`` (fan_in, r),
  ``loha_b1``, ``loha_b2`` (r, fan_out)."""

  def __init__(self, base, spec: LoHaSpec, view, path="", *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = param_dtype(spec, base)
    r, fan_in, fan_out = spec.rank, view.fan_in, view.fan_out
    k1, k2, k3 = jax.random.split(rngs.params(), 3)
    sharding = adapter_base.sharding_for_factors(base, view)
    param = adapter_base.AdapterParam
    self.loha_a1 = param(uniform_fan_in(k1, (fan_in, r), fan_in).astype(dtype), **sharding["a"])
    self.loha_b1 = param(uniform_fan_in(k2, (r, fan_out), r).astype(dtype), **sharding["b"])
    self.loha_a2 = param(jnp.zeros((fan_in, r), dtype), **sharding["a"])
    self.loha_b2 = param(uniform_fan_in(k3, (r, fan_out), r).astype(dtype), **sharding["b"])

  def factors(self) -> tuple[Array, Array]:
    return hadamard_factors(self.loha_a1[...], self.loha_b1[...], self.loha_a2[...],
                            self.loha_b2[...])

  def adapter_forward(self, x, **kwargs):
    y = self.base(x, **kwargs)
    k_in, k_out = self.factors()
    z = self.view.project_in(self.base, x, k_in, **kwargs)
    return y + self.view.project_out(self.spec.scale * z, k_out).astype(y.dtype)

  def delta_matrix(self):
    f32 = lambda v: v[...].astype(jnp.float32)
    return self.spec.scale * ((f32(self.loha_a1) @ f32(self.loha_b1))
                              * (f32(self.loha_a2) @ f32(self.loha_b2)))


# -- Kronecker-sum adapters: LoKr, Compacter, SoKA ---------------------------------
class KroneckerSumAdapter(adapter_base.Adapter):
  """``dW = scale * sum_i a_i ⊗ b_i`` from stacks a (k, p, q), b (k, fan_in/p, fan_out/q).

  Subclasses implement `kron_factors` and `scale`.
  """

  def kron_factors(self) -> tuple[Array, Array]:
    raise NotImplementedError

  @property
  def scale(self) -> float:
    return 1.0

  def adapter_forward(self, x, **kwargs):
    y = self.base(x, **kwargs)
    if self.view.kind == "linear":
      a, b = self.kron_factors()
      update = self.scale * linalg.kron_sum_matmul(x, a, b)
    else:  # the update kernel through the base layer's contraction (not W0 + dW)
      kernel = self.view.from_matrix(self.delta_matrix()).astype(self.base.kernel.dtype)
      update = self.view.call_without_bias(self.base, x, kernel=kernel, **kwargs)
    return y + update.astype(y.dtype)

  def delta_matrix(self):
    a, b = self.kron_factors()
    return self.scale * linalg.kron_sum(a, b)


def check_kron_shape(method: str, path: str, kron_shape: tuple[int, int], fan_in: int,
                     fan_out: int) -> None:
  """The (p, q) first Kronecker factor must divide (fan_in, fan_out)."""
  p, q = kron_shape
  if p < 1 or q < 1 or fan_in % p or fan_out % q:
    raise ValueError(
        f"{method}{_where(path)}: Kronecker factor shape ({p}, {q}) does not multiply to the "
        f"layer's (fan_in, fan_out) = ({fan_in}, {fan_out}); p must divide fan_in and q must "
        "divide fan_out.")


def _check_kron_shape_arg(method: str, kron_shape) -> None:
  if kron_shape is None:
    return
  if len(kron_shape) != 2:
    raise ValueError(f"{method}: kron_shape must be a (p, q) pair or None, got {kron_shape!r}.")
  for dim in kron_shape:
    layers.check_positive_int(method, "kron_shape entries", dim)


class LoKrShapes(NamedTuple):
  """LoKr factor shapes in our layout: ``c`` (p, q), ``m`` (fan_in/p, fan_out/q),
  and whether each is stored full or as a rank-r product."""

  c: tuple[int, int]
  m: tuple[int, int]
  full_c: bool
  full_m: bool


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoKrSpec(adapter_base.AdapterSpec):
  """LoKr (LyCORIS; Edalati et al., "KronA: Parameter Efficient Tuning with
  Kronecker Adapter", 2022, for the Kronecker update; PEFT's LoKr):

      dW = s * C ⊗ M,   C (p, q),  M (fan_in/p, fan_out/q) = M_a M_b (rank r) or full,
      s = alpha / r.

  Dims are split as in PEFT (`linalg.kron_factorization`, the divisor pair
  near the square root, or ``decompose_factor``): ``fan_in = p * (fan_in/p)``
  and ``fan_out = q * (fan_out/q)`` with p, q the smaller members. M is stored
  full when ``r >= max(M's dims) / 2`` (PEFT's rule), C is full unless
  ``decompose_both`` and ``r < max(p, q) / 2``. ``kron_shape=(p, q)`` fixes C's
  shape; a shape that does not divide the layer's dims is an error.

  Init as PEFT's ``init_weights=True``: C = 0 (or C_a = 0 if decomposed),
  every other factor U(+-1/sqrt(fan)) with torch's fan. PEFT layout (out,
  in): ``lokr_w1 = C.T`` (``lokr_w1_a = C_b.T``, ``lokr_w1_b = C_a.T``) and
  ``lokr_w2 = M.T`` (``lokr_w2_a = M_b.T``, ``lokr_w2_b = M_a.T``). Conv layers:
  the flattened (prod(window) * in, out) matrix is factored, where PEFT
  factors the channels and keeps the window in M; not implemented: rank /
  module dropout, the CP decomposition of conv kernels, ``init_weights='lycoris'``.

  Attributes:
    rank: r of the decomposed factors.
    alpha: scaling numerator; None means alpha = r.
    decompose_factor: PEFT's ``decompose_factor`` (-1: near the square root).
    decompose_both: also store C as a rank-r product when r < max(p, q) / 2.
    kron_shape: (p, q) of C; overrides decompose_factor.
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "lokr"
  rank: int = 8
  alpha: float | None = None
  decompose_factor: int = -1
  decompose_both: bool = False
  kron_shape: tuple[int, int] | None = None
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"{self.name}: alpha must be > 0 or None, got {self.alpha!r}.")
    if self.decompose_factor != -1:
      layers.check_positive_int(self.name, "decompose_factor (or -1)", self.decompose_factor)
    _check_kron_shape_arg(self.name, self.kron_shape)

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def shapes(self, fan_in: int, fan_out: int, path: str = "") -> LoKrShapes:
    if self.kron_shape is None:
      p, m = linalg.kron_factorization(fan_in, self.decompose_factor)
      q, n = linalg.kron_factorization(fan_out, self.decompose_factor)
    else:
      check_kron_shape(self.name, path, self.kron_shape, fan_in, fan_out)
      p, q = self.kron_shape
      m, n = fan_in // p, fan_out // q
    full_c = not (self.decompose_both and self.rank < max(p, q) / 2)
    full_m = not self.rank < max(m, n) / 2
    return LoKrShapes((p, q), (m, n), full_c, full_m)

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    return LoKr(base, self, view, path, shapes=self.shapes(view.fan_in, view.fan_out, path),
                rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    shapes = self.shapes(fan_in, fan_out)
    count = lambda shape, full: math.prod(shape) if full else self.rank * sum(shape)
    return count(shapes.c, shapes.full_c) + count(shapes.m, shapes.full_m)


class LoKr(KroneckerSumAdapter):
  """A LoKr adapter (see `LoKrSpec`). Leaves ``lokr_c`` or ``lokr_c_a``/``lokr_c_b``,
  ``lokr_m`` or ``lokr_m_a``/``lokr_m_b``."""

  def __init__(self, base, spec: LoKrSpec, view, path="", *, shapes: LoKrShapes,
               rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = param_dtype(spec, base)
    r = spec.rank
    (p, q), (m, n) = shapes.c, shapes.m
    keys = jax.random.split(rngs.params(), 3)
    param = lambda value: adapter_base.AdapterParam(value.astype(dtype))
    if shapes.full_c:
      self.lokr_c = param(jnp.zeros((p, q)))
    else:  # PEFT: w1_a (q, r) = 0, w1_b (r, p) ~ U(1/sqrt(p))
      self.lokr_c_a = param(uniform_fan_in(keys[0], (p, r), p))
      self.lokr_c_b = param(jnp.zeros((r, q)))
    if shapes.full_m:  # PEFT: w2 (n, m), fan m
      self.lokr_m = param(uniform_fan_in(keys[1], (m, n), m))
    else:  # PEFT: w2_a (n, r), fan r; w2_b (r, m), fan m
      self.lokr_m_a = param(uniform_fan_in(keys[1], (m, r), m))
      self.lokr_m_b = param(uniform_fan_in(keys[2], (r, n), r))

  @property
  def scale(self) -> float:
    return self.spec.scale

  def _factor(self, name: str) -> Array:
    if hasattr(self, f"lokr_{name}"):
      return getattr(self, f"lokr_{name}")[...]
    return getattr(self, f"lokr_{name}_a")[...] @ getattr(self, f"lokr_{name}_b")[...]

  def kron_factors(self):
    return self._factor("c")[None], self._factor("m")[None]


def _largest_common_divisor(dims: Sequence[int], limit: int) -> int:
  """The largest n <= limit dividing every entry of ``dims``."""
  return max(n for n in range(1, limit + 1) if all(d % n == 0 for d in dims))


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class CompacterSpec(adapter_base.AdapterSpec):
  """Compacter's low-rank parameterized hypercomplex multiplication (LPHM) as a
  weight update (Karimi Mahabadi, Henderson & Ruder, "Compacter: Efficient
  Low-Rank Hypercomplex Adapter Layers", 2021):

      dW = sum_{i<n} A_i ⊗ (s_i t_i^T),   A_i (p, q) shared across layers,
      s_i (fan_in/p,), t_i (fan_out/q,) per layer.

  The paper's A_i are n x n (p = q = n), which is what ``n`` alone gives.
  Differences from the paper: (1) Compacter uses LPHM matrices as the down-
  and up-projections of a bottleneck adapter ``h + U GELU(D h)``; here the
  LPHM matrix is the additive update of the adapted layer itself, so it
  merges into the kernel. (2) A_i may be rectangular (``a_shape``), so that
  layers whose fan_in and fan_out share no divisor still get n > 1 terms.

  The shared "slow" weights A (n, p, q) are one trainable variable per attach
  call (`shared_state`), referenced by every adapter, so the model state
  holds them once and their gradient sums over layers. ``num_params`` counts
  them as if the layer were the only one.

  Init: A ~ N(0, 1), s ~ U(+-1/sqrt(fan_in/p)), t = 0 (identity at init), so
  that the n terms act like the n columns of a LoRA factor at its usual scale.

  Attributes:
    n: number of terms. None: max(p, q).
    a_shape: (p, q) of the A_i; p must divide every adapted layer's fan_in and
      q its fan_out. None: (n, n) if n is given, else p (q) the largest
      number <= 4 dividing every adapted fan_in (fan_out).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "compacter"
  n: int | None = None
  a_shape: tuple[int, int] | None = None
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "n", self.n, allow_none=True)
    _check_kron_shape_arg(self.name, self.a_shape)

  def resolve(self, sites: Sequence[tuple[str, layers.LayerView]]) -> tuple[int, int, int]:
    """``(n, p, q)`` for these (path, view) sites, checked against every layer's dims."""
    if self.a_shape is not None:
      p, q = self.a_shape
    elif self.n is not None:
      p = q = self.n
    else:
      p = _largest_common_divisor([v.fan_in for _, v in sites], 4)
      q = _largest_common_divisor([v.fan_out for _, v in sites], 4)
    for path, view in sites:
      check_kron_shape(self.name, path, (p, q), view.fan_in, view.fan_out)
    return (max(p, q) if self.n is None else self.n), p, q

  def shared_state(self, sites, *, rngs) -> adapter_base.AdapterParam:
    n, p, q = self.resolve([(path, layers.view_of(module, path)) for path, module in sites])
    a = jax.random.normal(rngs.params(), (n, p, q), jnp.float32)
    return adapter_base.AdapterParam(a.astype(param_dtype(self, sites[0][1])))

  def build(self, base, *, rngs, calibration=None, path="",
            shared: adapter_base.AdapterParam | None = None):
    del calibration
    view = layers.view_of(base, path)
    shared = self.shared_state([(path, base)], rngs=rngs) if shared is None else shared
    check_kron_shape(self.name, path, tuple(shared.shape[1:]), view.fan_in, view.fan_out)
    return Compacter(base, self, view, path, shared=shared, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    view = layers.LayerView("linear", (fan_in, fan_out), (fan_in,), (fan_out,), (0, 1))
    n, p, q = self.resolve([("", view)])
    return n * p * q + n * (fan_in // p + fan_out // q)


class Compacter(KroneckerSumAdapter):
  """A Compacter adapter (see `CompacterSpec`). Leaves: the shared
  ``compacter_a`` (n, p, q), per-layer ``compacter_s`` (n, fan_in/p) and
  ``compacter_t`` (n, fan_out/q)."""

  def __init__(self, base, spec: CompacterSpec, view, path="", *,
               shared: adapter_base.AdapterParam, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = param_dtype(spec, base)
    n, p, q = shared.shape
    rows = view.fan_in // p
    self.compacter_a = shared
    self.compacter_s = adapter_base.AdapterParam(
        uniform_fan_in(rngs.params(), (n, rows), rows).astype(dtype))
    self.compacter_t = adapter_base.AdapterParam(jnp.zeros((n, view.fan_out // q), dtype))

  def kron_factors(self):
    s, t = self.compacter_s[...], self.compacter_t[...]
    return self.compacter_a[...], s[:, :, None] * t[:, None, :]


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SoKASpec(adapter_base.AdapterSpec):
  """SoKA ("SVD on Kronecker Adaptation for Large Language Model", 2025):

      dW = sum_{i<k} A_i ⊗ B_i,   A_i (p, q),  B_i (fan_in/p, fan_out/q),

  initialized by the Kronecker-product SVD of the frozen weight
  (`linalg.kpsvd`, Van Loan & Pitsianis 1993): the k leading Kronecker
  components of W0 become the trainable factors and the base keeps the
  residual ``W0 - sum_i A_i ⊗ B_i``, so the layer starts at its original
  function (as PiSSA does with the matrix SVD). k is ``terms``, or with
  ``energy`` the smallest k <= terms whose components hold that fraction of
  ``||W0||_F^2``.

  What is checked: the KPSVD itself, against a numpy restatement of the
  paper's Algorithm 1 as a secondary summary (the Moonlight review) gives it:
  blocks of the matrix become rows of W', W' = U S V^T, the top r_kp terms
  ``s_k U_k ⊗ V_k``. What is not checked, since neither the paper's method
  section nor official code could be retrieved (docs/adapters_products.md
  lists what was searched): which matrix is decomposed (the abstract and the
  review say "the weight update"; W0 here, PiSSA-like, with the residual kept
  in the base), how s_k is split between the factors (sqrt(s_k) into each
  here), and the elbow criterion, which is not implemented (energy rule
  only). With ``energy`` set, `num_params` is the bound at k = terms; the
  chosen k is ``adapter.num_terms``.

  Attributes:
    terms: the number of Kronecker terms k (the upper bound with ``energy``).
    energy: None, or a fraction in (0, 1] of W0's energy the k terms must hold.
    kron_shape: (p, q) of the A_i; None splits the dims as LoKr does.
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "soka"
  terms: int = 2
  energy: float | None = None
  kron_shape: tuple[int, int] | None = None
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "terms", self.terms)
    if self.energy is not None and not 0.0 < self.energy <= 1.0:
      raise ValueError(f"{self.name}: energy must be in (0, 1] or None, got {self.energy!r}.")
    _check_kron_shape_arg(self.name, self.kron_shape)

  def a_shape(self, fan_in: int, fan_out: int, path: str = "") -> tuple[int, int]:
    if self.kron_shape is None:
      return linalg.kron_factorization(fan_in)[0], linalg.kron_factorization(fan_out)[0]
    check_kron_shape(self.name, path, self.kron_shape, fan_in, fan_out)
    return self.kron_shape

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration, rngs
    view = layers.view_of(base, path)
    p, q = self.a_shape(view.fan_in, view.fan_out, path)
    limit = min(p * q, view.fan_in * view.fan_out // (p * q))
    if self.terms > limit:
      raise ValueError(
          f"soka{_where(path)}: terms={self.terms} exceeds the {limit} Kronecker components of a "
          f"({view.fan_in}, {view.fan_out}) matrix with ({p}, {q}) first factors.")
    return SoKA(base, self, view, path, a_shape=(p, q))

  def num_params(self, fan_in: int, fan_out: int) -> int:
    p, q = self.a_shape(fan_in, fan_out)
    return self.terms * (p * q + fan_in * fan_out // (p * q))


def energy_terms(singular_values: Array, energy: float, limit: int) -> int:
  """The smallest k <= limit with ``sum_{i<k} s_i^2 >= energy * sum_i s_i^2``."""
  squared = jnp.asarray(singular_values, jnp.float32) ** 2
  fraction = jnp.cumsum(squared) / jnp.sum(squared)
  reached = int(jnp.sum(fraction < energy - 1e-6)) + 1
  return min(reached, limit)


class SoKA(KroneckerSumAdapter):
  """A SoKA adapter (see `SoKASpec`). Leaves ``soka_a`` (k, p, q), ``soka_b`` (k, m, n)."""

  def __init__(self, base, spec: SoKASpec, view, path="", *, a_shape: tuple[int, int]):
    super().__init__(base, spec, view, path)
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    a, b, singular_values = linalg.kpsvd(w0, a_shape, spec.terms)
    k = spec.terms if spec.energy is None else energy_terms(singular_values, spec.energy,
                                                            spec.terms)
    a, b = a[:k], b[:k]
    base.kernel[...] = view.from_matrix(w0 - linalg.kron_sum(a, b)).astype(base.kernel.dtype)
    dtype = param_dtype(spec, base)
    self.num_terms = k
    self.soka_a = adapter_base.AdapterParam(a.astype(dtype))
    self.soka_b = adapter_base.AdapterParam(b.astype(dtype))

  @property
  def replaces_base_kernel(self) -> bool:
    return True  # the base holds the KPSVD residual

  def kron_factors(self):
    return self.soka_a[...], self.soka_b[...]

"""High-rank and square adapters: MoRA, MiSS (Bone), Bat, HUT.

All in the (fan_in, fan_out) layout of `LayerView` (``y = x W``).

* MoRA (Jiang et al., "MoRA: High-Rank Updating for Parameter-Efficient
  Fine-Tuning", 2024): ``dy = f_dec(f_comp(x) M)`` with one square trainable
  ``M`` (r_hat, r_hat), zero at init, ``r_hat = round(sqrt((fan_in + fan_out) r))``.
  Both operators are fixed linear maps, so ``dW = C M_blk D``:
  'sharing' (the paper's Eq. 6, the official code's ``mora_type=1``): the input,
  wrapped around to a multiple of r_hat (``x_pad[p] = x[p mod fan_in]``), is cut
  into chunks of r_hat that are summed; ``M`` maps the sum; the output repeats
  it (``dy[o] = z[o mod r_hat]``). 'rope' (Eq. 9, ``mora_type=6``): the chunks
  are kept apart and chunk b is rotated by the RoPE angles ``b * 10000^(-2i/r_hat)``
  before the same ``M`` maps each chunk; the output is the concatenation of the
  chunks, truncated to fan_out (repeated when shorter). Differences from the
  paper: r_hat is rounded as in the official code (the paper writes the floor);
  for 'rope' r_hat is rounded down to even (the rotation pairs halves).
  The forward never forms dW: ``project_out((project_in(x, C)) M, D)``.
* MiSS (Kang et al., "Bone: Block-Affine Adaptation of Large Language Models",
  2024; renamed "MiSS: Balancing LoRA Performance and Efficiency with Simple
  Shard Sharing" and, in HF PEFT, the ``miss`` tuner): one shared zero-init
  block ``B`` (r, fan_out); the input is cut into chunks of r (zero-padded) that
  are summed, ``dy = (sum_j x_j) B``, i.e. ``dW[i, :] = B[i mod r, :]``. With
  ``mini_r`` (PEFT's ``init_weights='mini'``), ``B`` is (r, mini_r) and repeated
  along the outputs: ``dW[i, o] = B[i mod r, o mod mini_r]``.
* Bat (same paper, PEFT's ``miss`` with ``init_weights='bat'``): the weight in
  r x r blocks, block (i, j) of the (out, in) torch weight ``W_ij`` becomes
  ``W_ij (I + B_i) + B_i`` with one zero-init ``B_i`` (r, r) per output block row
  ``i``. The update depends on W0 (not additive); like PEFT, the forward forms
  the effective kernel.
* HUT (Zhang et al., "HUT: A More Computation Efficient Fine-Tuning Method With
  Hadamard Updated Transformation", 2024): ``W' = W0 ⊙ (1 + s A B)``,
  ``s = alpha / r``, with LoRA-shaped A (kaiming-uniform, bound 1/sqrt(fan_in))
  and B (zero). Unverified against HUT's paper: its method section and any
  official code could not be retrieved (see docs/adapters_highrank.md for what
  was searched); this is the form its abstract describes (W0 transformed by a
  Hadamard product with two low-rank matrices). The formula and init are those
  of HiRA (Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank
  Adaptation for Large Language Models", ICLR 2025), and at alpha = r (s = 1)
  this adapter equals HF PEFT's ``hira`` tuner numerically (tested). Not
  additive; the forward forms the effective kernel (an unmerged form would cost
  r products with W0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters import layers

Array = jax.Array


# -- fixed operators, as (fan_in, k) / (k, fan_out) matrices ------------------------------
def chunk_sum_matrix(fan_in: int, size: int, *, wrap: bool) -> Array:
  """``C`` (fan_in, size) with ``x C`` = the sum of x's chunks of ``size``.

  ``wrap``: the last chunk is completed with x's first entries (MoRA);
  otherwise with zeros (MiSS).
  """
  length = -(-fan_in // size) * size if wrap else fan_in
  positions = jnp.arange(length)
  return jnp.zeros((fan_in, size), jnp.float32).at[positions % fan_in, positions % size].add(1.0)


def rope_chunk_matrix(fan_in: int, size: int) -> Array:
  """``C`` (fan_in, chunks * size): x wrapped to whole chunks, chunk b RoPE-rotated by angle b."""
  chunks = -(-fan_in // size)
  positions = jnp.arange(chunks * size)
  picks = jnp.zeros((fan_in, chunks, size), jnp.float32).at[
      positions % fan_in, positions // size, positions % size].add(1.0)
  half = size // 2
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, size, 2, dtype=jnp.float32) / size))
  angles = jnp.arange(chunks, dtype=jnp.float32)[:, None] * jnp.concatenate([inv_freq, inv_freq])
  rotated_half = jnp.concatenate([-picks[..., half:], picks[..., :half]], axis=-1)
  rotated = picks * jnp.cos(angles) + rotated_half * jnp.sin(angles)
  return rotated.reshape(fan_in, chunks * size)


def repeat_matrix(size: int, fan_out: int) -> Array:
  """``D`` (size, fan_out) with ``(z D)[o] = z[o mod size]`` (repeat, truncate)."""
  return (jnp.arange(fan_out)[None, :] % size == jnp.arange(size)[:, None]).astype(jnp.float32)


def _largest_divisor(n: int, cap: int) -> int:
  return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _check_rank(name: str, rank):
  if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
    raise ValueError(f"{name}: rank must be a positive integer (or None), got {rank!r}.")


class _HighRankAdapter(adapter_base.Adapter):
  """Shared pieces: parameter dtype and the bias/forward of kernel-forming methods."""

  def _dtype(self):
    return self.spec.param_dtype or self.base.kernel.dtype

  def _w0(self) -> Array:
    return self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)

  def _forward_with_effective_kernel(self, x: Array, **kwargs) -> Array:
    y = self.view.call_without_bias(self.base, x, kernel=self.effective_kernel(), **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def _forward_with_factors(self, x: Array, compress: Array, mix, decompress: Array,
                            **kwargs) -> Array:
    """``base(x) + project_out(mix(project_in(x, compress)), decompress)``."""
    y = self.base(x, **kwargs)
    z = self.view.project_in(self.base, x, compress.astype(x.dtype), **kwargs)
    return y + self.view.project_out(mix(z), decompress).astype(y.dtype)


# -- MoRA -------------------------------------------------------------------------------------
MORA_VARIANTS = ("sharing", "rope")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class MoRASpec(adapter_base.AdapterSpec):
  """MoRA hyperparameters.

  Attributes:
    rank: the LoRA rank whose parameter budget M matches: r_hat = round(sqrt((fan_in + fan_out) r)).
    variant: 'sharing' (the official mora_type=1) or 'rope' (mora_type=6).
    param_dtype: dtype of M; None uses the base kernel's.
  """

  name = "mora"
  rank: int = 8
  variant: str = "sharing"
  param_dtype: Any = None

  def __post_init__(self):
    _check_rank(self.name, self.rank)
    if self.rank is None:
      raise ValueError("mora: rank must be a positive integer, got None.")
    if self.variant not in MORA_VARIANTS:
      raise ValueError(f"mora: variant must be one of {MORA_VARIANTS}, got {self.variant!r}.")

  def square_size(self, fan_in: int, fan_out: int) -> int:
    size = int(math.sqrt((fan_in + fan_out) * self.rank) + 0.5)
    return size // 2 * 2 if self.variant == "rope" else size

  def build(self, base, *, rngs, calibration=None, path=""):
    del rngs, calibration
    view = layers.view_of(base, path)
    if self.square_size(view.fan_in, view.fan_out) < (2 if self.variant == "rope" else 1):
      raise ValueError(f"mora at '{path}': rank={self.rank} gives an empty square matrix.")
    return MoRA(base, self, view, path)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.square_size(fan_in, fan_out) ** 2


class MoRA(_HighRankAdapter):
  """A MoRA adapter; leaf ``mora_m`` (r_hat, r_hat), zero at init (``z -> z M``)."""

  def __init__(self, base: nnx.Module, spec: MoRASpec, view: layers.LayerView, path: str = ""):
    super().__init__(base, spec, view, path)
    size = spec.square_size(view.fan_in, view.fan_out)
    self.mora_m = adapter_base.AdapterParam(jnp.zeros((size, size), self._dtype()))

  def operators(self) -> tuple[Array, Array]:
    """(compress (fan_in, k), decompress (k, fan_out)); k = r_hat or chunks * r_hat."""
    size = self.mora_m.shape[0]
    if self.spec.variant == "sharing":
      compress = chunk_sum_matrix(self.view.fan_in, size, wrap=True)
    else:
      compress = rope_chunk_matrix(self.view.fan_in, size)
    return compress, repeat_matrix(compress.shape[1], self.view.fan_out)

  def _mix(self, z: Array) -> Array:
    """M applied to every chunk of r_hat on the last axis."""
    m = self.mora_m[...].astype(z.dtype)
    chunks = z.reshape(z.shape[:-1] + (-1, m.shape[0]))
    return (chunks @ m).reshape(z.shape)

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    compress, decompress = self.operators()
    return self._forward_with_factors(x, compress, self._mix, decompress, **kwargs)

  def delta_matrix(self) -> Array:
    compress, decompress = self.operators()
    return self._mix(compress) @ decompress


# -- MiSS (Bone) -----------------------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class MiSSSpec(adapter_base.AdapterSpec):
  """MiSS / Bone hyperparameters.

  Attributes:
    rank: chunk size r <= fan_in (PEFT's r); None: min(64, fan_in).
    mini_r: None (B is (r, fan_out)), or a divisor of fan_out (B is (r, mini_r),
      repeated along the outputs; PEFT's init_weights='mini').
    param_dtype: dtype of B; None uses the base kernel's.
  """

  name = "miss"
  rank: int | None = None
  mini_r: int | None = None
  param_dtype: Any = None

  def __post_init__(self):
    _check_rank(self.name, self.rank)
    if self.mini_r is not None and (not isinstance(self.mini_r, int) or self.mini_r <= 0):
      raise ValueError(f"miss: mini_r must be a positive integer or None, got {self.mini_r!r}.")

  def chunk(self, fan_in: int) -> int:
    return min(64, fan_in) if self.rank is None else self.rank

  def validate(self, view: layers.LayerView, path: str) -> None:
    r = self.chunk(view.fan_in)
    if r > view.fan_in:
      raise ValueError(f"miss at '{path}': rank={r} exceeds fan_in={view.fan_in}.")
    if self.mini_r is not None and view.fan_out % self.mini_r:
      raise ValueError(f"miss at '{path}': mini_r={self.mini_r} must divide fan_out={view.fan_out}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del rngs, calibration
    view = layers.view_of(base, path)
    self.validate(view, path)
    return MiSS(base, self, view, path)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.chunk(fan_in) * (fan_out if self.mini_r is None else self.mini_r)


class MiSS(_HighRankAdapter):
  """A MiSS adapter; leaf ``miss_block`` (r, fan_out or mini_r), zero at init (PEFT's layout)."""

  def __init__(self, base: nnx.Module, spec: MiSSSpec, view: layers.LayerView, path: str = ""):
    super().__init__(base, spec, view, path)
    width = view.fan_out if spec.mini_r is None else spec.mini_r
    sharding = adapter_base.sharding_for_factors(base, view)["b"] if spec.mini_r is None else {}
    self.miss_block = adapter_base.AdapterParam(
        jnp.zeros((spec.chunk(view.fan_in), width), self._dtype()), **sharding)

  def shared_block(self) -> Array:
    """B repeated to (r, fan_out)."""
    block = self.miss_block[...]
    return jnp.tile(block, (1, self.view.fan_out // block.shape[1]))

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    compress = chunk_sum_matrix(self.view.fan_in, self.miss_block.shape[0], wrap=False)
    return self._forward_with_factors(x, compress, lambda z: z, self.shared_block(), **kwargs)

  def delta_matrix(self) -> Array:
    block = self.shared_block().astype(jnp.float32)
    return jnp.tile(block, (-(-self.view.fan_in // block.shape[0]), 1))[: self.view.fan_in]


# -- Bat -------------------------------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class BatSpec(adapter_base.AdapterSpec):
  """Bat hyperparameters.

  Attributes:
    rank: block size r, dividing fan_in and fan_out; None: the largest common
      divisor of fan_in and fan_out that is <= 64.
    param_dtype: dtype of the blocks; None uses the base kernel's.
  """

  name = "bat"
  rank: int | None = None
  param_dtype: Any = None

  def __post_init__(self):
    _check_rank(self.name, self.rank)

  def block(self, fan_in: int, fan_out: int) -> int:
    return _largest_divisor(math.gcd(fan_in, fan_out), 64) if self.rank is None else self.rank

  def build(self, base, *, rngs, calibration=None, path=""):
    del rngs, calibration
    view = layers.view_of(base, path)
    r = self.block(view.fan_in, view.fan_out)
    if view.fan_in % r or view.fan_out % r:
      raise ValueError(
          f"bat at '{path}': block size rank={r} must divide fan_in={view.fan_in} and "
          f"fan_out={view.fan_out} (common divisors: "
          f"{[d for d in range(1, math.gcd(view.fan_in, view.fan_out) + 1) if math.gcd(view.fan_in, view.fan_out) % d == 0]}).")
    return Bat(base, self, view, path)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return fan_out * self.block(fan_in, fan_out)


class Bat(_HighRankAdapter):
  """A Bat adapter; leaf ``bat_blocks`` (fan_out / r, r, r), zero at init (PEFT's layout)."""

  additive = False

  def __init__(self, base: nnx.Module, spec: BatSpec, view: layers.LayerView, path: str = ""):
    super().__init__(base, spec, view, path)
    r = spec.block(view.fan_in, view.fan_out)
    self.bat_blocks = adapter_base.AdapterParam(jnp.zeros((view.fan_out // r, r, r), self._dtype()))

  def effective_matrix(self) -> Array:
    blocks = self.bat_blocks[...].astype(jnp.float32)
    n_out, r, _ = blocks.shape
    w0 = self._w0()
    # w[j, b, i, a] = W0[j r + b, i r + a]: input block j, output block i.
    w = w0.reshape(self.view.fan_in // r, r, n_out, r)
    # torch (out, in) block W_ij -> W_ij B_i + B_i, written in the (in, out) layout.
    delta = jnp.einsum("jbia,ibc->jcia", w, blocks) + jnp.transpose(blocks, (2, 0, 1))[None]
    return w0 + delta.reshape(w0.shape)

  def delta_matrix(self) -> Array:
    return self.effective_matrix() - self._w0()

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    return self._forward_with_effective_kernel(x, **kwargs)


# -- HUT -------------------------------------------------------------------------------------
@adapter_base.register
@dataclasses.dataclass(frozen=True)
class HUTSpec(adapter_base.AdapterSpec):
  """HUT hyperparameters.

  Attributes:
    rank: r of the modulation ``A B``.
    alpha: scale numerator, ``s = alpha / r``; None means alpha = r.
    param_dtype: dtype of A and B; None uses the base kernel's.
  """

  name = "hut"
  rank: int = 8
  alpha: float | None = None
  param_dtype: Any = None

  def __post_init__(self):
    _check_rank(self.name, self.rank)
    if self.rank is None:
      raise ValueError("hut: rank must be a positive integer, got None.")
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"hut: alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}.")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    return HUT(base, self, layers.view_of(base, path), path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out)


class HUT(_HighRankAdapter):
  """A HUT adapter; leaves ``hut_a`` (fan_in, r) kaiming-uniform, ``hut_b`` (r, fan_out) zero."""

  additive = False

  def __init__(self, base: nnx.Module, spec: HUTSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    factors = lora_init.default_init(rngs.params(), jnp.zeros((view.fan_in, view.fan_out)),
                                     spec.rank, spec.scale)
    sharding = adapter_base.sharding_for_factors(base, view)
    self.hut_a = adapter_base.AdapterParam(factors.a.astype(self._dtype()), **sharding["a"])
    self.hut_b = adapter_base.AdapterParam(factors.b.astype(self._dtype()), **sharding["b"])

  def effective_matrix(self) -> Array:
    modulation = self.spec.scale * (self.hut_a[...].astype(jnp.float32)
                                    @ self.hut_b[...].astype(jnp.float32))
    return self._w0() * (1.0 + modulation)

  def delta_matrix(self) -> Array:
    return self.effective_matrix() - self._w0()

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    return self._forward_with_effective_kernel(x, **kwargs)

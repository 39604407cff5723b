"""POET: reparameterized training by orthogonal equivalence transformation.

Qiu, Buchholz, Xiao, Dax, Schölkopf & Liu, "Reparameterized LLM Training via
Orthogonal Equivalence Transformation" (2025). In the (fan_in, fan_out) layout
(``y = x W``) the trained weight is

    W = R_in W0 R_out,     R_in in O(fan_in), R_out in O(fan_out),

with W0 frozen (the paper's ``W = R W0 P`` on the transposed (out, in) weight:
``R = R_out^T``, ``P = R_in^T``). Orthogonal factors leave singular values
unchanged, so the spectrum of W is the spectrum of W0 throughout training.

Each orthogonal factor is ``R = Pi^T diag(G_1, ..., G_k) Pi`` with a random
permutation ``Pi`` and ``b x b`` blocks (POET-BS, block-stochastic; block_size
None is the full variant: one block, no permutation). Every block is the
Cayley transform of a skew-symmetric ``Q`` (b(b-1)/2 trainable entries),
either exact ``(I + Q)(I - Q)^{-1}`` or the Cayley-Neumann series of order k,
``(I + Q)(I + Q + ... + Q^k)`` (CNP). Q = 0 gives R = I exactly, so with
``w0_init='base'`` the layer starts as the base layer.

Merge-then-reinitialize (`POETMergeReinit`, every T steps): ``W0 <- R_in W0
R_out``, Q <- 0, new permutations, and the optimizer moments of Q are zeroed.

W0 initializations (``w0_init``), the first two as in the official code
(github.com/Sphere-AI-Lab/poet, ``replace_linear_with_poet`` with
``init_type``): 'normalized' takes the base layer's own init and scales every
neuron (output column here, row of the official (out, in) weight) to unit
norm (the official default); 'mup_normalized' then scales the whole matrix so
that its spectral norm is ``mup_alpha * sqrt(fan_out / fan_in)``. Two more
are ours, not in the official code: 'normalized_gaussian' draws a fresh
Gaussian and normalizes its neurons ('normalized' on a Gaussian base init),
and 'uniform_spectrum' is a random matrix with all singular values 1 (a
random semi-orthogonal matrix). 'base' keeps the base init as it is.

Differences from the official code (github.com/Sphere-AI-Lab/poet): the
official CNP kernel truncates the expanded series ``I + 2(Q + ... + Q^k)``
while this one uses the paper's product form (both have O(||Q||^{k+1})
error); the forward forms the effective kernel and runs the base layer's own
contraction with it (a multiplicative method), instead of the input-centric
``((x R_in) W0) R_out`` of POET-X, so it works on every layer kind (Conv,
Einsum) at the cost of an extra (fan_in, fan_out) temporary; resetting the
optimizer moments of Q at each merge is our choice (after the merge Q = 0
parameterizes a different point).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import linalg
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.reparam import events

Array = jax.Array

PARAMETRIZATIONS = ("cayley_neumann", "cayley")
W0_INITS = ("base", "normalized", "mup_normalized", "normalized_gaussian", "uniform_spectrum")


def block_layout(block_size: int | None, n: int, side: str, path: str) -> tuple[int, int]:
  """(number of blocks, block size) of one side of dimension ``n``."""
  if block_size is None:
    return 1, n
  if n % block_size:
    raise ValueError(
        f"poet at '{path}': block_size={block_size} does not divide {side}={n}; choose a divisor "
        f"of both fan_in and fan_out, or block_size=None for full orthogonal matrices.")
  return n // block_size, block_size


def orthogonal_blocks(q: Array, block: int, parametrization: str, order: int) -> Array:
  """(k, b, b) orthogonal blocks from packed skew parameters q (k, b(b-1)/2), float32."""
  skew = linalg.skew_from_vector(q.astype(jnp.float32), block)
  if parametrization == "cayley":
    return linalg.cayley(skew)
  return linalg.cayley_neumann(skew, order)


def normalized_gaussian(key: Array, fan_in: int, fan_out: int) -> Array:
  """Gaussian (fan_in, fan_out) matrix with unit-norm columns (neurons)."""
  return normalize_neurons(jax.random.normal(key, (fan_in, fan_out), jnp.float32))


def normalize_neurons(w: Array) -> Array:
  """``w`` (fan_in, fan_out) with every output column scaled to unit L2 norm."""
  return w / linalg.column_norms(w)[None, :]


def mup_normalized(w: Array, mup_alpha: float) -> Array:
  """`normalize_neurons`, then spectral norm ``mup_alpha * sqrt(fan_out / fan_in)``."""
  fan_in, fan_out = w.shape
  w = normalize_neurons(w)
  return w * (mup_alpha * (fan_out / fan_in) ** 0.5 / jnp.linalg.norm(w, ord=2))


def uniform_spectrum(key: Array, fan_in: int, fan_out: int) -> Array:
  """Random (fan_in, fan_out) matrix whose singular values are all 1."""
  return linalg.polar(jax.random.normal(key, (fan_in, fan_out), jnp.float32))


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class POETSpec(adapter_base.AdapterSpec):
  """POET hyperparameters.

  Attributes:
    block_size: b for POET-BS (must divide fan_in and fan_out); None for the
      full variant (one fan_in x fan_in and one fan_out x fan_out factor).
    neumann_order: k >= 1, the order of the Cayley-Neumann series.
    parametrization: 'cayley_neumann' (CNP, no inverse) or 'cayley' (exact).
    w0_init: 'base', 'normalized', 'mup_normalized', 'normalized_gaussian' or
      'uniform_spectrum' (see module).
    mup_alpha: > 0, the spectral-norm factor of 'mup_normalized' (official default 1).
    param_dtype: dtype of the Q parameters; None uses the base kernel's.
  """

  name = "poet"
  block_size: int | None = None
  neumann_order: int = 4
  parametrization: str = "cayley_neumann"
  w0_init: str = "base"
  mup_alpha: float = 1.0
  param_dtype: object = None

  def __post_init__(self):
    if self.block_size is not None and (not isinstance(self.block_size, int)
                                        or self.block_size < 2):
      raise ValueError(f"poet: block_size must be an integer >= 2 or None, got {self.block_size!r}.")
    if not isinstance(self.neumann_order, int) or self.neumann_order < 1:
      raise ValueError(f"poet: neumann_order k must be an integer >= 1, got {self.neumann_order!r}.")
    if self.parametrization not in PARAMETRIZATIONS:
      raise ValueError(
          f"poet: parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}.")
    if self.w0_init not in W0_INITS:
      raise ValueError(f"poet: w0_init must be one of {W0_INITS}, got {self.w0_init!r}.")
    if not self.mup_alpha > 0:
      raise ValueError(f"poet: mup_alpha must be > 0, got {self.mup_alpha!r}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    block_layout(self.block_size, view.fan_in, "fan_in", path)
    block_layout(self.block_size, view.fan_out, "fan_out", path)
    cls = POET if self.w0_init == "base" else POETFromRandomW0
    return cls(base, self, view, path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    def side(n):
      k, b = (1, n) if self.block_size is None else (n // self.block_size, self.block_size)
      return k * linalg.skew_size(b)
    return side(fan_in) + side(fan_out)


class POET(adapter_base.Adapter):
  """A POET layer: ``W = R_in W0 R_out`` around the frozen base kernel W0.

  Leaves: ``q_in`` (k_in, b(b-1)/2) and ``q_out`` (k_out, b(b-1)/2) trainable,
  zero at init; ``perm_in`` (fan_in,) and ``perm_out`` (fan_out,) int32 buffers.
  """

  identity_at_init = True
  additive = False
  constrained_update = True  # W only rotates W0: its singular values are those of W0

  def __init__(self, base: nnx.Module, spec: POETSpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    key_w0, key_perm = jax.random.split(rngs.params())
    if spec.w0_init != "base":
      w0 = self.initial_w0(key_w0, view.to_matrix(base.kernel[...]).astype(jnp.float32))
      base.kernel[...] = view.from_matrix(w0).astype(base.kernel.dtype)
    self.k_in, self.b_in = block_layout(spec.block_size, view.fan_in, "fan_in", path)
    self.k_out, self.b_out = block_layout(spec.block_size, view.fan_out, "fan_out", path)
    dtype = spec.param_dtype or base.kernel.dtype
    self.q_in = adapter_base.AdapterParam(jnp.zeros((self.k_in, linalg.skew_size(self.b_in)), dtype))
    self.q_out = adapter_base.AdapterParam(
        jnp.zeros((self.k_out, linalg.skew_size(self.b_out)), dtype))
    perm_in, perm_out = self.sample_permutations(key_perm)
    self.perm_in = adapter_base.AdapterBuffer(perm_in)
    self.perm_out = adapter_base.AdapterBuffer(perm_out)

  def initial_w0(self, key: Array, w: Array) -> Array:
    """W0 (fan_in, fan_out) from the base init ``w`` by ``spec.w0_init`` (not 'base')."""
    init = self.spec.w0_init
    if init == "normalized":
      return normalize_neurons(w)
    if init == "mup_normalized":
      return mup_normalized(w, self.spec.mup_alpha)
    make = normalized_gaussian if init == "normalized_gaussian" else uniform_spectrum
    return make(key, *w.shape)

  def sample_permutations(self, key: Array) -> tuple[Array, Array]:
    """New random permutations (identity for the full variant)."""
    fan_in, fan_out = self.view.fan_in, self.view.fan_out
    if self.spec.block_size is None:
      return jnp.arange(fan_in, dtype=jnp.int32), jnp.arange(fan_out, dtype=jnp.int32)
    key_in, key_out = jax.random.split(key)
    return (jax.random.permutation(key_in, fan_in).astype(jnp.int32),
            jax.random.permutation(key_out, fan_out).astype(jnp.int32))

  def blocks(self) -> tuple[Array, Array]:
    """The orthogonal blocks (k_in, b, b) of R_in and (k_out, b, b) of R_out."""
    spec = self.spec
    return (orthogonal_blocks(self.q_in[...], self.b_in, spec.parametrization, spec.neumann_order),
            orthogonal_blocks(self.q_out[...], self.b_out, spec.parametrization, spec.neumann_order))

  def orthogonal_factors(self) -> tuple[Array, Array]:
    """Dense R_in (fan_in, fan_in) and R_out (fan_out, fan_out), for checks."""
    g_in, g_out = self.blocks()
    return (linalg.permuted_block_diag(g_in, self.perm_in[...]),
            linalg.permuted_block_diag(g_out, self.perm_out[...]))

  def effective_matrix(self) -> Array:
    """``R_in W0 R_out`` in float32 by two permuted block-diagonal products."""
    g_in, g_out = self.blocks()
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    # R_in W0 = (W0^T R_in^T)^T, and R_in^T has the transposed blocks.
    left = linalg.block_diag_matmul(w0.T, jnp.swapaxes(g_in, -1, -2), self.perm_in[...]).T
    return linalg.block_diag_matmul(left, g_out, self.perm_out[...])

  def delta_matrix(self) -> Array:
    w0 = self.view.to_matrix(self.base.kernel[...]).astype(jnp.float32)
    return self.effective_matrix() - w0

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    kernel = self.effective_kernel()
    y = self.view.call_without_bias(self.base, x, kernel=kernel, **kwargs)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def merge_and_reinitialize(self, key: Array) -> None:
    """``W0 <- R_in W0 R_out``, Q <- 0, new permutations: the function is unchanged."""
    self.base.kernel[...] = self.effective_kernel()
    self.q_in[...] = jnp.zeros_like(self.q_in[...])
    self.q_out[...] = jnp.zeros_like(self.q_out[...])
    perm_in, perm_out = self.sample_permutations(key)
    self.perm_in[...] = perm_in
    self.perm_out[...] = perm_out


class POETFromRandomW0(POET):
  """POET whose W0 is redrawn at build (w0_init != 'base'): not the base function at init."""

  identity_at_init = False


@events.register("poet_merge_reinit")
@dataclasses.dataclass(frozen=True)
class POETMergeReinit(events.Periodic):
  """POET's merge-then-reinitialize every ``every`` steps, on every POET layer.

  Also zeros the optimizer moments of every ``q_in`` / ``q_out`` (see the
  module docstring). ``seed`` and the step determine the new permutations.
  """

  seed: int = 0

  def __call__(self, model, opt_state, step):
    key = self.step_key(self.seed, step)
    for i, (path, layer) in enumerate(events.modules_of_type(model, POET)):
      layer.merge_and_reinitialize(jax.random.fold_in(key, i))
      for leaf in ("q_in", "q_out"):
        value = getattr(layer, leaf)
        opt_state = events.zero_param_state(opt_state, path + (leaf,), value.shape)
    return model, opt_state

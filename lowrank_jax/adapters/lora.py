"""LoRA: low-rank adaptation of a frozen linear-like layer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021):

    y = x W0 + s * (dropout(x) A) B (+ b_lora),   A (fan_in, r), B (r, fan_out)

with ``s = alpha / r``, or ``s = alpha / sqrt(r)`` for rsLoRA (Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023). The
initializations (PEFT's kaiming-uniform default, gaussian, PiSSA, MiLoRA,
OLoRA) are in `lowrank_jax.adapters.init`. The forward never forms
``W0 + s A B``; `merge` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import stats
from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import init as lora_init
from lowrank_jax.adapters import layers
from lowrank_jax.kernels import lora_matmul as lora_kernel

Array = jax.Array


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
  """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: Array, b: Array, scale: float) -> Array:
  """The LoRA update ``s * A @ B`` in (fan_in, fan_out) layout, in float32."""
  return scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))


KERNEL_IMPLEMENTATIONS = (None, "auto", "xla", "pallas")


def has_default_contraction(base: nnx.Module) -> bool:
  """Whether ``base`` is an ``nnx.Linear`` with nnx's own contraction (the kernel reproduces it)."""
  return (isinstance(base, nnx.Linear) and base.dot_general is jax.lax.dot_general
          and base.preferred_element_type is None)


def fused_linear_base(base: nnx.Module, x: Array, path: str) -> tuple[Array, Array]:
  """``x`` and the kernel of an ``nnx.Linear`` promoted as the layer's own forward does.

  Raises if the layer overrides its contraction (the fused kernel would bypass it).
  """
  if not has_default_contraction(base):
    raise ValueError(
        f"'{path}': the fused LoRA kernel reproduces nnx.Linear's default contraction only; this "
        "layer sets a custom dot_general or preferred_element_type. Use implementation=None.")
  x, kernel, _ = base.promote_dtype((x, base.kernel[...], None), dtype=base.dtype)
  return x, kernel


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoRASpec(adapter_base.AdapterSpec):
  """LoRA hyperparameters.

  Attributes:
    rank: r >= 1; weight-aware inits need r <= min(fan_in, fan_out).
    alpha: scaling numerator; None means alpha = r (scale 1 for plain LoRA).
    rslora: use ``alpha / sqrt(r)`` instead of ``alpha / r``.
    init: 'default' (PEFT: kaiming-uniform A, zero B), 'gaussian', 'pissa',
      'pissa_niter_<k>', 'milora', 'olora', or a gradient init that reads the
      calibration gradient: 'lora_ga', 'lora_one', 'gora'.
    init_gamma: gamma of the gradient inits (None: the init's default, see
      `lowrank_jax.adapters.init.GRADIENT_INITS`).
    compensate: for gradient inits, store ``W0 - s A B`` in the frozen base so
      the layer starts at the base function (None: the paper's default,
      True for LoRA-GA, False for LoRA-One and GoRA).
    dropout: dropout rate on the adapter input, in [0, 1).
    use_bias: add a trainable bias on the adapter path (PEFT's lora_bias).
    param_dtype: dtype of the adapter parameters; None uses the base kernel's.
    implementation: None (the default) uses the XLA form of
      `lowrank_jax.kernels.lora_matmul` (hand-written backward, merged-weight
      strategy for large batches) on plain ``nnx.Linear`` layers without
      dropout, and the layer view with autodiff everywhere else (any layer
      kind, dropout, custom contractions). 'auto', 'xla' or 'pallas' demand the
      kernel, on ``nnx.Linear`` layers without dropout only ('auto' lets the
      kernel dispatcher choose: Pallas on TPU, XLA elsewhere).
    interpret: run the Pallas kernel in the interpreter (tests on CPU).
  """

  name = "lora"
  rank: int = 8
  alpha: float | None = None
  rslora: bool = False
  init: str = "default"
  dropout: float = 0.0
  use_bias: bool = False
  param_dtype: Any = None
  init_gamma: float | None = None
  compensate: bool | None = None
  implementation: str | None = None
  interpret: bool = False

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"{self.name}: alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout!r}.")
    lora_init.check_init(self.init)
    if self.init_gamma is not None and not self.init_gamma > 0:
      raise ValueError(f"{self.name}: init_gamma must be > 0 (or None), got {self.init_gamma!r}.")
    if not lora_init.needs_grad(self.init) and (self.init_gamma is not None
                                                 or self.compensate is not None):
      raise ValueError(f"{self.name}: init_gamma and compensate apply to the gradient inits "
                       f"{sorted(lora_init.GRADIENT_INITS)}, not to init={self.init!r}.")
    if self.implementation not in KERNEL_IMPLEMENTATIONS:
      raise ValueError(f"{self.name}: implementation must be one of {KERNEL_IMPLEMENTATIONS}, "
                       f"got {self.implementation!r}.")

  @property
  def scale(self) -> float:
    return lora_scale(self.rank if self.alpha is None else self.alpha, self.rank, self.rslora)

  def validate(self, view: layers.LayerView, path: str) -> None:
    """Checks that need the layer's shape; errors name the layer path."""
    limit = min(view.fan_in, view.fan_out)
    if lora_init.is_weight_aware(self.init) and self.rank > limit:
      raise ValueError(
          f"{self.name} at '{path}': rank={self.rank} exceeds min(fan_in, fan_out) = "
          f"min({view.fan_in}, {view.fan_out}) = {limit}, the largest rank init={self.init!r} "
          "can take from the weight's decomposition.")
    if lora_init.needs_grad(self.init):
      grad_limit = lora_init.gradient_rank_limit(self.init, view.fan_in, view.fan_out)
      if self.rank > grad_limit:
        raise ValueError(
            f"{self.name} at '{path}': rank={self.rank} exceeds {grad_limit}, the largest rank "
            f"init={self.init!r} can take on a ({view.fan_in}, {view.fan_out}) layer.")
    if self.use_bias and view.kind == "einsum":
      raise ValueError(f"{self.name} at '{path}': use_bias is not supported on nnx.Einsum layers.")
    if self.implementation is not None:
      if view.kind != "linear":
        raise ValueError(
            f"{self.name} at '{path}': implementation={self.implementation!r} (the fused kernel) "
            f"supports nnx.Linear layers; this one is {view.kind!r}. Use implementation=None.")
      if self.dropout > 0:
        raise ValueError(
            f"{self.name} at '{path}': implementation={self.implementation!r} needs dropout=0 "
            f"(the fused kernel reads one input); got dropout={self.dropout}.")

  @property
  def adapter_type(self) -> type["LoRA"]:
    """The adapter module this spec builds (subclass specs return their own)."""
    return LoRA

  def calibration_grad(self, calibration, view: layers.LayerView, path: str) -> Array | None:
    """The site's calibration gradient for gradient inits (None for the others)."""
    if not lora_init.needs_grad(self.init):
      return None
    grad = stats.site_stats(calibration, path, f"{self.name} init={self.init!r}", "grad")
    if tuple(grad.shape) != (view.fan_in, view.fan_out):
      raise ValueError(
          f"{self.name} at '{path}': the calibration gradient has shape {tuple(grad.shape)}, the "
          f"layer is ({view.fan_in}, {view.fan_out}); were the statistics collected on another model?")
    return grad

  def build(self, base, *, rngs, calibration=None, path=""):
    view = layers.view_of(base, path)
    self.validate(view, path)
    grad = self.calibration_grad(calibration, view, path)
    return self.adapter_type(base, self, view, path, rngs=rngs, grad=grad)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    return self.rank * (fan_in + fan_out) + (fan_out if self.use_bias else 0)


class LoRA(adapter_base.Adapter):
  """A LoRA adapter around a frozen base layer (see the module docstring).

  Leaves: ``lora_a`` (fan_in, r), ``lora_b`` (r, fan_out), optional
  ``lora_bias`` (fan_out features, in the kernel's output shape).
  """

  def __init__(self, base: nnx.Module, spec: LoRASpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs, grad: Array | None = None):
    super().__init__(base, spec, view, path)
    w0 = view.to_matrix(base.kernel[...]).astype(jnp.float32)
    if lora_init.needs_grad(spec.init):
      alpha = spec.rank if spec.alpha is None else spec.alpha
      factors = lora_init.gradient_factors(spec.init, rngs.params(), w0, grad, spec.rank,
                                           spec.scale, alpha, spec.init_gamma, spec.compensate)
    else:
      factors = lora_init.lora_factors(spec.init, rngs.params(), w0, spec.rank, spec.scale)
    if factors.residual is not None:
      base.kernel[...] = view.from_matrix(factors.residual).astype(base.kernel.dtype)
    dtype = spec.param_dtype or base.kernel.dtype
    sharding = adapter_base.sharding_for_factors(base, view)
    self.lora_a = adapter_base.AdapterParam(factors.a.astype(dtype), **sharding["a"])
    self.lora_b = adapter_base.AdapterParam(factors.b.astype(dtype), **sharding["b"])
    self.lora_bias = (adapter_base.AdapterParam(jnp.zeros(view.out_shape, dtype))
                      if spec.use_bias else None)
    self.dropout = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None

  @property
  def scale(self) -> float:
    return self.spec.scale

  @property
  def identity_at_init(self) -> bool:
    """False only for a gradient init that does not compensate W0 (LoRA-One, GoRA by default)."""
    return lora_init.starts_at_base(self.spec.init, self.spec.compensate)

  @property
  def replaces_base_kernel(self) -> bool:
    return lora_init.is_weight_aware(self.spec.init)

  def adapter_input(self, x: Array) -> Array:
    return self.dropout(x) if self.dropout is not None else x

  def factors(self) -> tuple[Array, Array]:
    """The factors (A, B) the forward multiplies by (a subclass may mask their gradients)."""
    return self.lora_a[...], self.lora_b[...]

  def low_rank_output(self, x: Array, **kwargs) -> Array:
    """``s * (x A) B`` in the base output layout (x already dropped out)."""
    a, b = self.factors()
    z = self.view.project_in(self.base, x, a, **kwargs)
    # Scaling the rank-r activations instead of the output saves a full-size pass.
    return self.view.project_out(self.scale * z, b)

  def adapter_bias(self, ndim: int) -> Array | None:
    if self.lora_bias is None:
      return None
    return self.view.broadcast_out(self.lora_bias[...].reshape(-1), ndim)

  @property
  def uses_kernel(self) -> bool:
    """Whether the forward runs `lowrank_jax.kernels.lora_matmul` (see LoRASpec.implementation)."""
    if self.spec.implementation is not None:
      return True
    # Exactly nnx.Linear: a subclass may override __call__, which the kernel would bypass.
    return (self.dropout is None and type(self.base) is nnx.Linear
            and has_default_contraction(self.base))

  @property
  def kernel_implementation(self) -> str | None:
    """The kernels' ``implementation`` argument: 'xla' by default, None (dispatch) for 'auto'."""
    impl = self.spec.implementation
    return "xla" if impl is None else None if impl == "auto" else impl

  def fused_output(self, x: Array) -> Array:
    """``x W0 + s (x A) B`` without any bias, by `lowrank_jax.kernels.lora_matmul`."""
    x, kernel = fused_linear_base(self.base, x, self.path)
    a, b = self.factors()
    return lora_kernel.lora_matmul(
        x, kernel, a.astype(kernel.dtype), b.astype(kernel.dtype),
        scale=self.scale, implementation=self.kernel_implementation,
        interpret=self.spec.interpret)

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    if self.uses_kernel:
      if kwargs:
        raise TypeError(f"lora at '{self.path}': the fused kernel takes no call arguments; "
                        f"got {sorted(kwargs)}.")
      y = self.fused_output(x)
      base_bias = self.view.bias(self.base, y.ndim)
      y = y if base_bias is None else y + base_bias.astype(y.dtype)
    else:
      y = self.base(x, **kwargs)
      y = y + self.low_rank_output(self.adapter_input(x), **kwargs).astype(y.dtype)
    bias = self.adapter_bias(y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def delta_matrix(self) -> Array:
    return lora_delta(self.lora_a[...], self.lora_b[...], self.scale)

  def merge(self) -> nnx.Module:
    merged = super().merge()
    if self.lora_bias is not None:
      bias = self.lora_bias[...].reshape(self.view.out_shape)
      if merged.bias is None:
        merged.bias = nnx.Param(bias.astype(merged.kernel.dtype))
        merged.use_bias = True
      else:
        merged.bias[...] = (merged.bias[...] + bias.reshape(merged.bias.shape)).astype(merged.bias.dtype)
    return merged

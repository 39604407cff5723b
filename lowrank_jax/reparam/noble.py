"""NOBLE: a permanent nonlinear low-rank branch on a dense layer trained from scratch.

Smith, "NOBLE: Accelerating Transformers with Nonlinear Low-Rank Branches"
(2026, arXiv:2603.06492; official code github.com/ethansmith2000/noble). In the
(fan_in, fan_out) layout (``y = x W``):

    y = x W + b + sigma(x W_down + b_down) W_up,
    sigma = CosNet:  sigma(h) = cos(w2 * (cos(w1 * h + p1) M + c) + p2),

with W (fan_in, fan_out), W_down (fan_in, r), W_up (r, fan_out), the mixing
matrix M (r, r) with bias c (r,), and per-unit frequencies w1, w2 and phases
p1, p2 (r,), all trained (``*`` is elementwise). ``activation='cos'`` is the
single cosine layer ``cos(w1 * h + p1)``; 'gelu', 'silu', 'tanh', 'relu' are
the paper's fixed-activation ablations (no extra parameters).

Initialization (as in the official ``NOBLELinearCosNet``): W_down ~ N(0,
1/fan_in), b_down = 0; w ~ U(min_freq, max_freq) = U(0.8, 1.2); p ~
N(0, phase_std^2) = N(0, 0.1^2), reduced mod 2 pi; M ~ N(0, (mix_init_scale /
sqrt(r))^2) with mix_init_scale 0.5, c ~ U(+-1/sqrt(r)) (PyTorch's Linear
default); W_up ~ N(0, (up_init_scale / sqrt(r))^2) with up_init_scale 0.01, so
the branch is small but not zero at init (``identity_at_init`` is False;
``up_init_scale=0`` makes the layer equal to the base at init).

Learning-rate multipliers of the official code (`lr_multipliers`,
`optimizer`): W_up ``(min(fan_in, fan_out) / r)^(2 * 0.2)``, frequencies 2,
phases 4, M ``(min(fan_in, fan_out) / r)^0.5``; every other leaf 1. (The
official code attaches M's multiplier to the module rather than to its
weight, so its optimizer helper does not read it; we apply it to M.)

The layer is trained from scratch, so the dense weight W is a trainable leaf
(``kernel``, in the base kernel's layout) and the base kernel is zeroed at
build, as for weight normalization. W keeps the base layer's init unless
``linear_init_scale`` is given (the official code redraws W ~ N(0,
(0.5 / sqrt(fan_in))^2) and zeroes the bias). The base bias stays a frozen
base parameter. The branch is nonlinear, so no kernel holds the layer:
``mergeable = False`` and `merge` raises. The branch runs in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.optim import labels
from lowrank_jax.reparam import events

Array = jax.Array

FIXED_ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "silu": jax.nn.silu,
                     "tanh": jnp.tanh}
ACTIVATIONS = ("cosnet", "cos") + tuple(FIXED_ACTIVATIONS)


def cos_activation(h: Array, freq: Array, phase: Array) -> Array:
  """``cos(freq * h + phase)`` over the last axis of ``h``."""
  return jnp.cos(freq * h + phase)


def cosnet(h: Array, freq_in: Array, phase_in: Array, mix: Array, mix_bias: Array,
           freq_out: Array, phase_out: Array) -> Array:
  """CosNet ``cos(w2 * (cos(w1 * h + p1) M + c) + p2)`` over the last axis of ``h``."""
  return cos_activation(cos_activation(h, freq_in, phase_in) @ mix + mix_bias, freq_out, phase_out)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class NOBLESpec(adapter_base.AdapterSpec):
  """NOBLE hyperparameters (defaults from the official code except ``rank``).

  Attributes:
    rank: bottleneck width r, 1 <= r <= min(fan_in, fan_out) (official default 32).
    activation: 'cosnet' (the paper's choice), 'cos', 'gelu', 'silu', 'tanh' or 'relu'.
    min_freq, max_freq: the frequencies are drawn from U(min_freq, max_freq), 0 < min <= max.
    phase_std: std of the Gaussian phase init, >= 0.
    mix_init_scale: std of M is mix_init_scale / sqrt(r), >= 0.
    up_init_scale: std of W_up is up_init_scale / sqrt(r), >= 0 (0: identity at init).
    linear_init_scale: None keeps the base init of W; a float > 0 redraws
      W ~ N(0, (linear_init_scale / sqrt(fan_in))^2) (official: 0.5).
    up_lr_power: W_up's learning-rate multiplier is (min(fan_in, fan_out) / r)^(2 up_lr_power).
    mix_lr_power: M's multiplier is (min(fan_in, fan_out) / r)^mix_lr_power.
    freq_lr: multiplier of the frequencies; phase_lr: of the phases.
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "noble"
  rank: int = 4
  activation: str = "cosnet"
  min_freq: float = 0.8
  max_freq: float = 1.2
  phase_std: float = 0.1
  mix_init_scale: float = 0.5
  up_init_scale: float = 0.01
  linear_init_scale: float | None = None
  up_lr_power: float = 0.2
  mix_lr_power: float = 0.5
  freq_lr: float = 2.0
  phase_lr: float = 4.0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int("noble", "rank", self.rank)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"noble: activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
    if not 0 < self.min_freq <= self.max_freq:
      raise ValueError(f"noble: need 0 < min_freq <= max_freq, got min_freq={self.min_freq!r}, "
                       f"max_freq={self.max_freq!r}.")
    for field in ("phase_std", "mix_init_scale", "up_init_scale"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"noble: {field} must be >= 0, got {getattr(self, field)!r}.")
    if self.linear_init_scale is not None and not self.linear_init_scale > 0:
      raise ValueError(f"noble: linear_init_scale must be > 0 or None, got "
                       f"{self.linear_init_scale!r}.")

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    view = layers.view_of(base, path)
    layers.check_rank_fits_layer("noble", path, self.rank, view)
    return NOBLE(base, self, view, path, rngs=rngs)

  def branch_params(self) -> int:
    """Trainable parameters of sigma: 4r + r^2 + r for CosNet, 2r for 'cos', 0 otherwise."""
    r = self.rank
    return {"cosnet": 4 * r + r * r + r, "cos": 2 * r}.get(self.activation, 0)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    r = self.rank
    return fan_in * fan_out + r * (fan_in + 1) + r * fan_out + self.branch_params()

  def lr_multipliers(self, fan_in: int, fan_out: int) -> dict[str, float]:
    """Learning-rate multiplier of each leaf that has one (the others have 1)."""
    ratio = min(fan_in, fan_out) / self.rank
    return {"up": ratio ** (2 * self.up_lr_power), "mix": ratio ** self.mix_lr_power,
            "freq_in": self.freq_lr, "freq_out": self.freq_lr,
            "phase_in": self.phase_lr, "phase_out": self.phase_lr}


def initial_frequencies(key: Array, spec: NOBLESpec) -> Array:
  return jax.random.uniform(key, (spec.rank,), jnp.float32, spec.min_freq, spec.max_freq)


def initial_phases(key: Array, spec: NOBLESpec) -> Array:
  return jnp.fmod(spec.phase_std * jax.random.normal(key, (spec.rank,), jnp.float32), 2 * math.pi)


class NOBLE(adapter_base.Adapter):
  """``y = x W + b + sigma(x W_down + b_down) W_up`` (see the module docstring).

  Leaves (trainable): ``kernel`` W (base kernel layout), ``down`` (fan_in, r),
  ``down_bias`` (r,), ``up`` (r, fan_out); for 'cos' and 'cosnet'
  ``freq_in``, ``phase_in`` (r,); for 'cosnet' also ``mix`` (r, r),
  ``mix_bias``, ``freq_out``, ``phase_out`` (r,). The base kernel is zero.
  """

  identity_at_init: ClassVar[bool] = False
  additive: ClassVar[bool] = False
  mergeable: ClassVar[bool] = False

  def __init__(self, base: nnx.Module, spec: NOBLESpec, view: layers.LayerView, path: str = "",
               *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = spec.param_dtype or base.kernel.dtype
    r, fan_in, fan_out = spec.rank, view.fan_in, view.fan_out
    keys = iter(jax.random.split(rngs.params(), 9))
    kernel = base.kernel[...]
    if spec.linear_init_scale is not None:
      w = spec.linear_init_scale / math.sqrt(fan_in) * jax.random.normal(
          next(keys), (fan_in, fan_out), jnp.float32)
      kernel = view.from_matrix(w).astype(kernel.dtype)
    self.kernel = adapter_base.AdapterParam(kernel.astype(dtype))
    base.kernel[...] = jnp.zeros_like(base.kernel[...])
    param = lambda value: adapter_base.AdapterParam(value.astype(dtype))
    self.down = param(jax.random.normal(next(keys), (fan_in, r), jnp.float32) / math.sqrt(fan_in))
    self.down_bias = param(jnp.zeros((r,)))
    self.up = param(spec.up_init_scale / math.sqrt(r)
                    * jax.random.normal(next(keys), (r, fan_out), jnp.float32))
    if spec.activation in ("cos", "cosnet"):
      self.freq_in = param(initial_frequencies(next(keys), spec))
      self.phase_in = param(initial_phases(next(keys), spec))
    if spec.activation == "cosnet":
      self.mix = param(spec.mix_init_scale / math.sqrt(r)
                       * jax.random.normal(next(keys), (r, r), jnp.float32))
      self.mix_bias = param(jax.random.uniform(next(keys), (r,), jnp.float32, -1.0, 1.0)
                            / math.sqrt(r))
      self.freq_out = param(initial_frequencies(next(keys), spec))
      self.phase_out = param(initial_phases(next(keys), spec))

  def nonlinearity(self, h: Array) -> Array:
    """sigma on the (..., r) bottleneck activations, float32."""
    f32 = lambda leaf: leaf[...].astype(jnp.float32)
    if self.spec.activation == "cosnet":
      return cosnet(h, f32(self.freq_in), f32(self.phase_in), f32(self.mix), f32(self.mix_bias),
                    f32(self.freq_out), f32(self.phase_out))
    if self.spec.activation == "cos":
      return cos_activation(h, f32(self.freq_in), f32(self.phase_in))
    return FIXED_ACTIVATIONS[self.spec.activation](h)

  def branch(self, x: Array, **kwargs) -> Array:
    """``sigma(x W_down + b_down) W_up`` in the base layer's output layout, float32."""
    h = self.view.project_in(self.base, x, self.down[...], **kwargs).astype(jnp.float32)
    h = self.nonlinearity(h + self.down_bias[...].astype(jnp.float32))
    return self.view.project_out(h, self.up[...].astype(jnp.float32))

  def adapter_forward(self, x: Array, **kwargs) -> Array:
    y = self.view.call_without_bias(self.base, x, kernel=self.kernel[...], **kwargs)
    y = y + self.branch(x, **kwargs).astype(y.dtype)
    bias = self.view.bias(self.base, y.ndim)
    return y if bias is None else y + bias.astype(y.dtype)

  def delta_matrix(self) -> Array:
    raise ValueError(f"noble at '{self.path}' is not mergeable: the branch "
                     f"{self.spec.activation}(x W_down) W_up is nonlinear in x, not a kernel.")

  def effective_matrix(self) -> Array:
    return self.delta_matrix()


def lr_multipliers(model: nnx.Module) -> dict[tuple, float]:
  """``{path to a NOBLE leaf: multiplier}`` for every NOBLE layer in ``model`` (see the module)."""
  table = {}
  for path, layer in events.modules_of_type(model, NOBLE):
    multipliers = layer.spec.lr_multipliers(layer.view.fan_in, layer.view.fan_out)
    for leaf, multiplier in multipliers.items():
      if hasattr(layer, leaf):
        table[tuple(str(p) for p in path) + (leaf,)] = multiplier
  return table


def optimizer(make_tx: Callable[[Any], optax.GradientTransformation],
              learning_rate: float | optax.Schedule,
              model: nnx.Module) -> optax.GradientTransformation:
  """``make_tx(learning_rate * multiplier)`` per NOBLE leaf (`optim.labels.partition_by_multiplier`).

  Leaves without a multiplier (W, W_down, biases, every non-NOBLE parameter)
  get ``make_tx(learning_rate)``; ``learning_rate`` may be an optax schedule. A model
  without NOBLE layers gets ``make_tx(learning_rate)`` itself. Example:
  ``nnx.Optimizer(model, noble.optimizer(optax.adamw, 1e-3, model), wrt=lrj.AdapterParam)``.
  """
  table = lr_multipliers(model)
  if not table:
    return make_tx(learning_rate)
  return labels.partition_by_multiplier(
      make_tx, learning_rate, lambda path, _: table.get(labels.key_names(path), 1.0),
      set(table.values()) | {1.0})

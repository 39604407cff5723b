"""Initializations of the LoRA factors as pure functions of the base weight.

Layout: ``w0`` is the (fan_in, fan_out) matrix with ``y = x w0``; the factors
are ``a`` (fan_in, r) and ``b`` (r, fan_out); the update is ``s * a @ b``.
PEFT stores ``nn.Linear.weight`` as (out, in) and ``lora_A.weight`` (r, in),
``lora_B.weight`` (out, r): ours are their transposes, ``a = lora_A.weight.T``,
``b = lora_B.weight.T``, and every formula below is PEFT's transposed.

Weight-aware inits return the residual base weight that keeps the adapted
layer's function unchanged at initialization: ``w_res = w0 - s * a @ b``.
Gradient inits (LoRA-GA, LoRA-One, GoRA) also read ``grad``, the mean
calibration gradient dL/dW0 in the same (fan_in, fan_out) layout
(`lowrank_jax.calibrate.collect`); whether they compensate W0 is an option
whose default follows each paper. Every function computes in float32 and
returns float32 arrays.

The weight-aware inits are written once for `jax.numpy` and NumPy (through
`linalg.namespace`): `lora_factors` runs them in NumPy when the weight sits
on one CPU device, so attaching on a CPU host compiles nothing, and jitted
everywhere else (accelerators, sharded weights, inside a trace).
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import linalg

Array = jax.Array


class LoRAFactors(NamedTuple):
  """Initial LoRA factors and, for weight-aware inits, the residual base weight."""

  a: Array
  b: Array
  residual: Array | None


def _kaiming_uniform_a(key: Array, fan_in: int, rank: int) -> Array:
  # PEFT/torch: kaiming_uniform_(lora_A.weight, a=sqrt(5)) on an (r, fan_in)
  # tensor: gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in).
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)


def default_init(key: Array, w0: Array, rank: int, scale: float) -> LoRAFactors:
  """PEFT's default: A kaiming-uniform (bound 1/sqrt(fan_in)), B = 0."""
  del scale
  fan_in, fan_out = w0.shape
  return LoRAFactors(_kaiming_uniform_a(key, fan_in, rank),
                     jnp.zeros((rank, fan_out), jnp.float32), None)


def gaussian_init(key: Array, w0: Array, rank: int, scale: float) -> LoRAFactors:
  """PEFT's ``init_lora_weights='gaussian'``: A ~ N(0, (1/r)^2), B = 0."""
  del scale
  fan_in, fan_out = w0.shape
  a = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
  return LoRAFactors(a, jnp.zeros((rank, fan_out), jnp.float32), None)


def _split_singular(u: Array, s: Array, vt: Array, w0: Array, scale: float) -> LoRAFactors:
  root = linalg.namespace(s).sqrt(s / scale)
  a = u * root[None, :]
  b = root[:, None] * vt
  return LoRAFactors(a, b, w0 - scale * (a @ b))


def pissa_init(key: Array, w0: Array, rank: int, scale: float, *,
               niter: int | None = None) -> LoRAFactors:
  """PiSSA (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation of Large Language Models", 2024).

  With the top-r SVD ``w0 ~= U_r S_r V_r^T``: ``a = U_r (S_r/s)^(1/2)``,
  ``b = (S_r/s)^(1/2) V_r^T`` and ``w_res = w0 - s a b`` (PEFT divides the
  singular values by the scale ``s`` so that ``s a b = U_r S_r V_r^T``).
  ``niter`` selects the randomized SVD with that many power iterations and a
  sketch of exactly r columns, PEFT's ``pissa_niter_k``
  (``torch.svd_lowrank(W, q=r, niter=k)``, no oversampling).
  """
  w0 = w0.astype(jnp.float32)
  if niter is None:
    u, s, vt = linalg.svd_topk(w0, rank)
  else:
    u, s, vt = linalg.randomized_svd(w0, rank, key=key, niter=niter, oversample=0)
  return _split_singular(u, s, vt, w0, scale)


def milora_init(key: Array, w0: Array, rank: int, scale: float) -> LoRAFactors:
  """MiLoRA (Wang et al., "MiLoRA: Harnessing Minor Singular Components for
  Parameter-Efficient LLM Finetuning", 2024): PiSSA with the r smallest
  singular triplets, so the principal components stay in the frozen residual.
  """
  del key
  w0 = w0.astype(jnp.float32)
  u, s, vt = linalg.svd_topk(w0, rank, largest=False)
  return _split_singular(u, s, vt, w0, scale)


def olora_init(key: Array, w0: Array, rank: int, scale: float) -> LoRAFactors:
  """OLoRA (Buyukakyuz, "OLoRA: Orthonormal Low-Rank Adaptation of Large
  Language Models", 2024).

  PEFT computes ``Q, R = qr(W)`` of the (out, in) weight and sets
  ``lora_B = Q[:, :r]`` (orthonormal columns), ``lora_A = R[:r]`` and
  ``W <- W - s lora_B lora_A``. In our layout ``W = w0^T``, so ``b = Q[:, :r]^T``
  has orthonormal rows and ``a = R[:r]^T``. The QR signs are those of LAPACK's
  Householder QR (no sign normalization), as in PEFT.
  """
  del key
  w0 = w0.astype(jnp.float32)
  q, r = linalg.namespace(w0).linalg.qr(w0.T)
  a = r[:rank].T
  b = q[:, :rank].T
  return LoRAFactors(a, b, w0 - scale * (a @ b))


def lora_ga_init(key: Array, w0: Array, grad: Array, rank: int, scale: float, alpha: float,
                 gamma: float) -> tuple[Array, Array]:
  """LoRA-GA (Wang et al., "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", 2024).

  Paper layout, with ``G = U S V^T`` the (out, in) gradient: ``A = c V[:, :r]^T``,
  ``B = c U[:, r:2r]`` with the 'stable' scale ``c = d_out^(1/4) / sqrt(gamma)``
  (the official code's ``direction='ArB2r'``, ``scale='stable'``), so that the
  first step of LoRA moves ``BA`` along the best rank-2r approximation of G.
  Ours: ``grad = G^T = V S U^T``, so ``a = c left[:, :r]`` and
  ``b = c right^T[r:2r]``, and W0 is compensated by default, as in the
  official code (Outsider565/LoRA-GA, checked). PEFT's LoRA-GA differs (it
  multiplies B by the singular values and scales B only). The exact SVD is
  used where the official code uses ``torch.svd_lowrank(q=4r, niter=4)``.
  """
  del key, w0, scale, alpha
  fan_out = grad.shape[1]
  left, _, right_t = linalg.svd_topk(grad.astype(jnp.float32), 2 * rank)
  c = fan_out ** 0.25 / math.sqrt(gamma)
  return c * left[:, :rank], c * right_t[rank:2 * rank]


def lora_one_init(key: Array, w0: Array, grad: Array, rank: int, scale: float, alpha: float,
                  gamma: float) -> tuple[Array, Array]:
  """LoRA-One (Zhang, Liu & Chen, "One-step full gradient suffices for low-rank
  fine-tuning, provably and efficiently", ICML 2025).

  With the SVD ``-G = U S V^T`` of the negative gradient (paper layout):
  ``B = U_r S_r^(1/2) / sqrt(gamma s_1)``, ``A = S_r^(1/2) V_r^T / sqrt(gamma s_1)``,
  so ``BA = (-G)_r / (gamma s_1)``: one best rank-r gradient step, normalized by
  the top singular value s_1. Ours: ``a = left_r S_r^(1/2) / sqrt(gamma s_1)``,
  ``b = S_r^(1/2) right^T_r / sqrt(gamma s_1)`` from the SVD of ``-grad``.
  Checked against the official code (YuanheZ/LoRA-One, ``direction='LoRA-One'``,
  ``scale='stable'``): the same factors, no W0 compensation, default gamma 128
  (its config and README commands); its README formula omits the square root
  and the 1/s_1 that its code applies. The exact SVD is used where the
  official code calls ``torch.svd_lowrank(q=512, niter=16)``.
  """
  del key, w0, scale, alpha
  left, sigma, right_t = linalg.svd_topk(-grad.astype(jnp.float32), rank)
  root = jnp.sqrt(sigma / (gamma * sigma[0]))
  return left * root[None, :], root[:, None] * right_t


def gora_init(key: Array, w0: Array, grad: Array, rank: int, scale: float, alpha: float,
              gamma: float) -> tuple[Array, Array]:
  """GoRA's 'compress' init (He et al., "GoRA: Gradient-driven Adaptive Low Rank
  Adaptation", 2025).

  Paper layout: A random, ``B = -(gamma/alpha) G A^T (A A^T)^{-1}``, so
  ``s B A = -(s gamma/alpha) G A^T (A A^T)^{-1} A``, the least-squares
  projection of a gradient step onto the row space of A. Ours (``a = A^T``,
  ``b = B^T``): ``b = -(gamma/alpha) (a^T a)^{-1} a^T grad``, with A drawn as
  PEFT's default LoRA A and the official code's 1e-8 ridge on ``a^T a``.
  The official code multiplies by +gamma/alpha; we follow the paper's sign
  (a descent step).
  """
  del w0, scale
  fan_in, _ = grad.shape
  a = _kaiming_uniform_a(key, fan_in, rank)
  gram = a.T @ a + 1e-8 * jnp.eye(rank, dtype=jnp.float32)
  b = -(gamma / alpha) * jnp.linalg.solve(gram, a.T @ grad.astype(jnp.float32))
  return a, b


# Gradient inits: name -> (function, default gamma, W0 compensated by default).
GRADIENT_INITS = {
    "lora_ga": (lora_ga_init, 16.0, True),
    "lora_one": (lora_one_init, 128.0, False),
    "gora": (gora_init, 0.02, False),
}


def needs_grad(init: str) -> bool:
  """Whether ``init`` reads the calibration gradient."""
  return init in GRADIENT_INITS


def starts_at_base(init: str, compensate: bool | None) -> bool:
  """Whether the layer starts at the base function: every init but an uncompensated gradient init."""
  if not needs_grad(init):
    return True
  return GRADIENT_INITS[init][2] if compensate is None else compensate


def gradient_rank_limit(init: str, fan_in: int, fan_out: int) -> int:
  """The largest rank a gradient init can take (LoRA-GA uses 2r singular vectors)."""
  limit = min(fan_in, fan_out)
  return limit // 2 if init == "lora_ga" else limit


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def gradient_factors(init: str, key: Array, w0: Array, grad: Array, rank: int, scale: float,
                     alpha: float, gamma: float | None, compensate: bool | None) -> LoRAFactors:
  """Dispatch to the gradient init ``init``; ``gamma``/``compensate`` None take its defaults."""
  fn, default_gamma, default_compensate = GRADIENT_INITS[init]
  a, b = fn(key, w0, grad, rank, scale, alpha, default_gamma if gamma is None else gamma)
  compensate = default_compensate if compensate is None else compensate
  w0 = w0.astype(jnp.float32)
  return LoRAFactors(a, b, w0 - scale * (a @ b) if compensate else None)


_SIMPLE_INITS = {
    "default": default_init,
    "gaussian": gaussian_init,
    "pissa": pissa_init,
    "milora": milora_init,
    "olora": olora_init,
}
WEIGHT_AWARE = frozenset({"pissa", "milora", "olora"})
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
INIT_NAMES = tuple(sorted(_SIMPLE_INITS)) + ("pissa_niter_<k>",) + tuple(sorted(GRADIENT_INITS))


def is_weight_aware(init: str) -> bool:
  """Whether ``init`` reads the base weight (and replaces it by the residual)."""
  return init in WEIGHT_AWARE or _PISSA_NITER.fullmatch(init) is not None


def check_init(init: str) -> None:
  if init not in _SIMPLE_INITS and init not in GRADIENT_INITS and _PISSA_NITER.fullmatch(init) is None:
    raise ValueError(f"Unknown LoRA init {init!r}; known inits: {list(INIT_NAMES)}.")


def lora_factors(init: str, key: Array, w0: Array, rank: int, scale: float) -> LoRAFactors:
  """The LoRA init named ``init`` (see `INIT_NAMES`), as arrays placed like ``w0``.

  A weight-aware init of a weight on one CPU device runs in NumPy (LAPACK, no
  XLA compilation). Every other case runs `_compiled_lora_factors`, cached per
  init, shape, rank and scale, so attaching to many layers of the same shape
  compiles once. With ``pissa_niter_<k>`` the two draw their Gaussian sketch
  differently (`linalg.randomized_svd`); every other init gives the same
  factors on both, up to float rounding.
  """
  check_init(init)
  if is_weight_aware(init) and _on_one_cpu_device(w0):
    factors = _lora_factors(init, key, np.asarray(w0), rank, scale)
    return LoRAFactors(*(jax.device_put(x, w0.sharding) for x in factors))
  return _compiled_lora_factors(init, key, w0, rank, scale)


def _on_one_cpu_device(w0: Array) -> bool:
  if isinstance(w0, jax.core.Tracer) or not isinstance(w0, jax.Array):
    return False
  devices = w0.devices()
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _lora_factors(init: str, key: Array, w0: Array, rank: int, scale: float) -> LoRAFactors:
  match = _PISSA_NITER.fullmatch(init)
  if match:
    return pissa_init(key, w0, rank, scale, niter=int(match.group(1)))
  return _SIMPLE_INITS[init](key, w0, rank, scale)


_compiled_lora_factors = jax.jit(_lora_factors, static_argnums=(0, 3, 4))

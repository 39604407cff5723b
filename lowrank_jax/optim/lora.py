"""LoRA-aware optimizers: transforms that see each site's factors (A, B) together.

Layout: at every adapter site the params hold ``lora_a`` (fan_in, r) and
``lora_b`` (r, fan_out) with ``dW = s a b``; the papers' (out, in) layout has
``A = a^T`` (r, in), ``B = b^T`` (out, r), so ``B^T B = b b^T`` and
``A A^T = a^T a`` (both r x r). Leaves that are not a ``lora_a``/``lora_b``
pair (heads, biases, other adapters) pass through the pair preconditioners
unchanged. With ``G = dL/dW`` (fan_in, fan_out): ``grad_a = s G b^T``,
``grad_b = s a^T G``.

* LoRA+ (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large
  Models", 2024): the learning rate of B is ``ratio`` times that of A.
* Scaled GD / Riemannian preconditioned LoRA (Zhang & Pilanci, "Riemannian
  Preconditioned LoRA for Fine-Tuning Foundation Models", 2024):
  ``gA <- (B^T B + dI)^-1 gA``, ``gB <- gB (A A^T + dI)^-1``; ours
  ``g_a <- g_a (b b^T + dI)^-1``, ``g_b <- (a^T a + dI)^-1 g_b``.
* LoRA-Pro (Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly
  Optimized?", 2024): the factor gradients whose induced update
  ``s (B gA + gB A) = P_B G + (I - P_B) G P_A`` is the closest low-rank-
  tangent approximation of the full gradient, with the free r x r matrix X
  chosen by the paper's Sylvester equation (closest to the plain gradients).
* AltLoRA (Yu et al., "AltLoRA: Towards Better Gradient Approximation in
  Low-Rank Adaptation with Alternating Projections", 2025; official code
  LucasXinYu/AltLoRA): A is stepped with ``(B^T B + lI)^-1 gA``, then B
  with ``gB (A_new A_new^T + lI)^-1`` at the updated A; first-moment momentum
  kept in the low-rank space and transported to the new factors.

All but LoRA+ make the induced update invariant under ``(B, A) -> (B M,
M^-1 A)`` (ours ``(a, b) -> (a N, N^-1 b)``), up to the ridge terms.

Each registers a closed-form ``state_bytes`` (for a constant learning rate;
a schedule adds optax's int32 step count), checked against the real state by
tests/optim/optimizer_contract_test.py.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import registry
from lowrank_jax.optim import sites

PyTree = Any
PAIR = ("lora_a", "lora_b")
PairFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _check_pairs(groups: dict[str, dict[str, Any]], what: str) -> None:
  for site, leaves in groups.items():
    if set(leaves) != set(PAIR):
      raise ValueError(f"{what}: site '{site}' has {sorted(leaves)}; LoRA-pair optimizers need both "
                       f"lora_a (fan_in, r) and lora_b (r, fan_out) trainable.")
    a, b = leaves["lora_a"], leaves["lora_b"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
      raise ValueError(f"{what}: site '{site}' has lora_a {a.shape} and lora_b {b.shape}; expected "
                       "(fan_in, r) and (r, fan_out).")


def map_pairs(fn: PairFn, updates: PyTree, params: PyTree, what: str) -> PyTree:
  """``updates`` with each site's (g_a, g_b) replaced by ``fn(g_a, g_b, a, b)``, in float32."""
  if params is None:
    raise ValueError(f"{what}: update needs params (the current factors).")
  factors = sites.group(params, PAIR)
  _check_pairs(factors, what)

  def per_site(site, grads):
    a, b = factors[site]["lora_a"], factors[site]["lora_b"]
    f32 = lambda x: x.astype(jnp.float32)
    u_a, u_b = fn(f32(grads["lora_a"]), f32(grads["lora_b"]), f32(a), f32(b))
    return {"lora_a": u_a.astype(grads["lora_a"].dtype), "lora_b": u_b.astype(grads["lora_b"].dtype)}

  return sites.map_sites(per_site, updates, PAIR)


def _ridge_inverse(gram: jax.Array, delta: float) -> jax.Array:
  return jnp.linalg.inv(gram + delta * jnp.eye(gram.shape[0], dtype=gram.dtype))


def _check_positive(name: str, value: float, what: str) -> None:
  if not value > 0:
    raise ValueError(f"{what}: {name} must be > 0, got {value!r}.")


# -- state bytes --------------------------------------------------------------------
def adam_state_bytes(params, **unused) -> int:
  """optax Adam(W): an int32 count, then mu and nu in the parameter dtype."""
  del unused
  return 4 + 2 * registry.tree_bytes(params)


def sgd_state_bytes(params, momentum=None, **unused) -> int:
  """optax SGD: a momentum trace in the parameter dtype when ``momentum`` is given, else nothing."""
  del unused
  return 0 if momentum is None else registry.tree_bytes(params)


def altlora_state_bytes(params, **unused) -> int:
  """An int32 count, a float32 momentum per leaf, and the previous b (parameter dtype) per leaf."""
  del unused
  sizes = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  return 4 + 4 * sizes + registry.tree_bytes(params)


# -- LoRA+ ------------------------------------------------------------------------
def scale_lora_b(ratio: float) -> optax.GradientTransformation:
  """Multiply the updates of the ``lora_b`` leaves by ``ratio`` (LoRA+'s lr_B / lr_A)."""
  _check_positive("ratio", ratio, "lora_plus")

  def update_fn(updates, state, params=None):
    del params
    mask = sites.leaf_mask(updates, ("lora_b",))
    return jax.tree_util.tree_map(lambda u, m: u * ratio if m else u, updates, mask), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


@registry.register("lora_plus", example={}, params="lora", state_bytes=adam_state_bytes)
def lora_plus(learning_rate: optax.ScalarOrSchedule, ratio: float = 16.0, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
              ) -> optax.GradientTransformation:
  """LoRA+: AdamW with the learning rate of B ``ratio`` times that of A (paper: ratio ~ 16)."""
  return optax.chain(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
                     scale_lora_b(ratio))


# -- scaled GD / Riemannian preconditioned LoRA -----------------------------------------
def scale_by_lora_precondition(delta: float = 1e-6) -> optax.GradientTransformation:
  """``g_a (b b^T + dI)^-1`` and ``(a^T a + dI)^-1 g_b`` at every LoRA site."""
  _check_positive("delta", delta, "scale_by_lora_precondition")

  def precondition(g_a, g_b, a, b):
    return g_a @ _ridge_inverse(b @ b.T, delta), _ridge_inverse(a.T @ a, delta) @ g_b

  def update_fn(updates, state, params=None):
    return map_pairs(precondition, updates, params, "scale_by_lora_precondition"), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


@registry.register("scaled_gd", example={}, params="lora", state_bytes=sgd_state_bytes)
def scaled_gd(learning_rate: optax.ScalarOrSchedule, delta: float = 1e-6,
              momentum: float | None = None) -> optax.GradientTransformation:
  """Scaled GD (Zhang & Pilanci, 2024): preconditioned factor gradients, then SGD."""
  return optax.chain(scale_by_lora_precondition(delta), optax.sgd(learning_rate, momentum=momentum))


@registry.register("scaled_adamw", example={}, params="lora", state_bytes=adam_state_bytes)
def scaled_adamw(learning_rate: optax.ScalarOrSchedule, delta: float = 1e-6, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
                 ) -> optax.GradientTransformation:
  """Riemannian preconditioned AdamW (Zhang & Pilanci, 2024): AdamW on preconditioned gradients."""
  return optax.chain(scale_by_lora_precondition(delta),
                     optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


# -- LoRA-Pro -----------------------------------------------------------------------------
def _sylvester_sym(p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
  """Y with ``P Y + Y Q = C`` for symmetric positive definite P, Q (by eigendecomposition)."""
  lp, vp = jnp.linalg.eigh(p)
  lq, vq = jnp.linalg.eigh(q)
  return vp @ ((vp.T @ c @ vq) / (lp[:, None] + lq[None, :])) @ vq.T


def lora_pro_gradients(g_a, g_b, a, b, *, scale: float, delta: float):
  """LoRA-Pro's factor gradients (Theorems 2.1-2.2), in our layout.

  Paper: ``gA = (1/s^2)(B^T B)^-1 dA + X A``,
  ``gB = (1/s^2)[I - B (B^T B)^-1 B^T] dB (A A^T)^-1 - B X`` with
  ``B^T B X + X A A^T = -(1/s^2)(B^T B)^-1 dA A^T``. Ours, with ``Y = X^T``:
  ``g_a = (1/s^2) dA_ours (b b^T)^-1 + a Y``,
  ``g_b = (1/s^2)(a^T a)^-1 dB_ours [I - b^T (b b^T)^-1 b] - Y b``,
  ``a^T a Y + Y b b^T = -(1/s^2) a^T dA_ours (b b^T)^-1``.
  """
  inv_bb = _ridge_inverse(b @ b.T, delta)
  inv_aa = _ridge_inverse(a.T @ a, delta)
  k = 1.0 / (scale * scale)
  y = _sylvester_sym(a.T @ a + delta * jnp.eye(a.shape[1]), b @ b.T + delta * jnp.eye(b.shape[0]),
                     -k * (a.T @ g_a @ inv_bb))
  new_a = k * g_a @ inv_bb + a @ y
  g_b_proj = g_b - (g_b @ b.T) @ inv_bb @ b
  new_b = k * inv_aa @ g_b_proj - y @ b
  return new_a, new_b


def scale_by_lora_pro(scale: float = 1.0, delta: float = 1e-6) -> optax.GradientTransformation:
  """Replace each site's gradients by LoRA-Pro's equivalent-gradient factor gradients.

  ``scale`` is the adapters' s (alpha / r). Differs from the paper's AdamW
  variant, which keeps full (fan_in, fan_out) Adam moments of the equivalent
  gradient: here any optax transform may follow, on the factor gradients.
  """
  _check_positive("scale", scale, "scale_by_lora_pro")
  _check_positive("delta", delta, "scale_by_lora_pro")
  fn = lambda g_a, g_b, a, b: lora_pro_gradients(g_a, g_b, a, b, scale=scale, delta=delta)

  def update_fn(updates, state, params=None):
    return map_pairs(fn, updates, params, "scale_by_lora_pro"), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


@registry.register("lora_pro", example={}, params="lora", state_bytes=sgd_state_bytes)
def lora_pro(learning_rate: optax.ScalarOrSchedule, scale: float = 1.0, delta: float = 1e-6,
             momentum: float | None = None) -> optax.GradientTransformation:
  """LoRA-Pro (SGD form): equivalent-gradient factor gradients, then SGD."""
  return optax.chain(scale_by_lora_pro(scale, delta), optax.sgd(learning_rate, momentum=momentum))


# -- AltLoRA ------------------------------------------------------------------------------
class AltLoRAState(NamedTuple):
  count: jax.Array
  momentum: PyTree      # like the params, float32: the momentum of every leaf
  previous_b: PyTree    # like the params: b at the previous step (for the momentum transport)


@registry.register("altlora", example={}, params="lora", state_bytes=altlora_state_bytes)
def altlora(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, reg: float = 1e-3,
            weight_decay: float = 0.0) -> optax.GradientTransformation:
  """AltLoRA: alternating preconditioned factor steps with transported momentum.

  Per site, at step t (official code, our layout; ``lr_t = lr / (1 - b1^t)``):
    ``P_b = (b b^T + reg I)^-1``, ``m_a <- b1 m_a (b_prev b^T P_b) + (1-b1) g_a P_b``,
    ``a_new = a - lr_t m_a``;
    ``P_a = (a_new^T a_new + reg I)^-1``, ``m_b <- b1 (P_a a_new^T a) m_b + (1-b1) P_a g_b``,
    ``b_new = b - lr_t m_b``,
  then decoupled weight decay ``- lr wd x_new``. Other leaves get the same
  momentum rule without preconditioner. The official default b1 is 0.999.
  """
  if not 0.0 <= b1 < 1.0:
    raise ValueError(f"altlora: b1 must be in [0, 1), got {b1!r}.")
  _check_positive("reg", reg, "altlora")
  if weight_decay < 0:
    raise ValueError(f"altlora: weight_decay must be >= 0, got {weight_decay!r}.")
  lr_at = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init_fn(params):
    _check_pairs(sites.group(params, PAIR), "altlora")
    momentum = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return AltLoRAState(jnp.zeros((), jnp.int32), momentum, jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("altlora: update needs params (the current factors).")
    count = state.count + 1
    lr = lr_at(state.count)
    step = lr / (1.0 - b1 ** count.astype(jnp.float32))
    factors = sites.group(params, PAIR)
    moments = sites.group(state.momentum, PAIR)
    prev_b = sites.group(state.previous_b, PAIR)
    new_m, updates = {}, {}
    for site, leaves in sites.group(grads, PAIR).items():
      a, b = (factors[site][k].astype(jnp.float32) for k in PAIR)
      g_a, g_b = (leaves[k].astype(jnp.float32) for k in PAIR)
      m_a, m_b = (moments[site][k] for k in PAIR)
      p_b = _ridge_inverse(b @ b.T, reg)
      m_a = b1 * m_a @ (prev_b[site]["lora_b"] @ b.T @ p_b) + (1 - b1) * g_a @ p_b
      a_new = a - step * m_a
      p_a = _ridge_inverse(a_new.T @ a_new, reg)
      m_b = b1 * (p_a @ a_new.T @ a) @ m_b + (1 - b1) * p_a @ g_b
      b_new = b - step * m_b
      new_m[site] = {"lora_a": m_a, "lora_b": m_b}
      updates[site] = {"lora_a": a_new - a - lr * weight_decay * a_new,
                       "lora_b": b_new - b - lr * weight_decay * b_new}
    momentum = sites.map_sites(lambda s, _: new_m[s], state.momentum, PAIR)
    momentum = jax.tree_util.tree_map(
        lambda m, g, is_pair: m if is_pair else b1 * m + (1 - b1) * g,
        momentum, grads, sites.leaf_mask(grads, PAIR))
    out = sites.map_sites(lambda s, _: updates[s], grads, PAIR)
    out = jax.tree_util.tree_map(
        lambda u, m, x, is_pair: u if is_pair else (-step * m - lr * weight_decay * x).astype(u.dtype),
        out, momentum, params, sites.leaf_mask(grads, PAIR))
    out = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), out, grads)
    previous_b = sites.map_sites(lambda s, leaves: {"lora_a": leaves["lora_a"],
                                                    "lora_b": factors[s]["lora_b"]},
                                 state.previous_b, PAIR)
    return out, AltLoRAState(count, momentum, previous_b)

  return optax.GradientTransformation(init_fn, update_fn)

"""Regularizers of adapter factors, as functions of the model a loss can add.

    loss = task_loss(model) + gamma * lrj.adapters.regularizers.orthogonality(model)

They read the adapters of ``model`` (so they differentiate through
``nnx.grad`` like the task loss) and return a float32 scalar.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import factored

Array = jax.Array


def factor_orthogonality(a: Array, b: Array) -> Array:
  """``||a^T a - I||_F + ||b b^T - I||_F`` for a (fan_in, k) and b (k, fan_out), float32."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  eye = jnp.eye(a.shape[1], dtype=jnp.float32)
  return jnp.linalg.norm(a.T @ a - eye) + jnp.linalg.norm(b @ b.T - eye)


def _orthogonal_sites(model: nnx.Module, methods: Sequence[str] | None):
  from lowrank_jax.attach import adapters as list_adapters  # attach imports this package
  sites = []
  for path, adapter in list_adapters(model):
    if not isinstance(adapter, factored.Factored) or adapter.b is None:
      continue
    if methods is None:
      if not {"a", "b"} <= set(adapter.spec.train):
        continue
    elif adapter.spec.name not in methods:
      continue
    sites.append((path, adapter))
  return sites


def orthogonality(model: nnx.Module, methods: Sequence[str] | None = None) -> Array:
  """SORSA's regularizer: the mean over adapters of ``||a^T a - I||_F + ||b b^T - I||_F``.

  "SORSA: Singular Values and Orthonormal Regularized Singular Vectors
  Adaptation of Large Language Models" (2024): ``gamma (||U_p^T U_p - I||_F +
  ||V_p^T V_p - I||_F)``, non-squared norms averaged over the adapted matrices
  (as in the reference code). ``methods``: registry names of the adapters to
  include (e.g. ('sorsa',)); None takes every three-factor adapter whose
  ``a`` and ``b`` are both trained. Raises if no adapter matches.
  """
  sites = _orthogonal_sites(model, methods)
  if not sites:
    raise ValueError(f"orthogonality: the model has no three-factor adapter with trained a and b"
                     f"{'' if methods is None else f' among methods {list(methods)}'}.")
  terms = [factor_orthogonality(adapter.a[...], adapter.b[...]) for _, adapter in sites]
  return sum(terms) / len(terms)


def adalora_orthogonality(model: nnx.Module) -> Array:
  """AdaLoRA's regularizer as PEFT computes it: the sum of ``||Q Q^T - I||_F`` and
  ``||P^T P - I||_F`` over all AdaLoRA factors, divided by the number of factors.

  "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
  (2023) writes squared norms; PEFT (AdaLoraModel.forward) uses plain
  Frobenius norms, which we follow. This is half of `orthogonality` over
  the same adapters.
  """
  return 0.5 * orthogonality(model, methods=("adalora",))

"""A mixture of LoRA experts routed in rank space: CoMoL.

Cao et al., "CoMoL: Efficient Mixture of LoRA Experts via Dynamic Core Space
Merging" (ACL Findings 2026, arXiv:2603.00573). The experts share one LoRA
subspace (A, B) and differ only by an r x r core C_i ("core space experts");
a router on the rank-r activation ``z = x A`` ("core space routing") mixes
the cores per token into one core (soft merging):

    y = x W0 + s * (z C(z)) B,   z = dropout(x) A,
    C(z) = sum_i g_i(z) C_i,     g(z) = softmax(z W_g)

with A (fan_in, r), B (r, fan_out), cores C (k, r, r) and the router W_g
(r, k): ``r (fan_in + fan_out) + k r^2 + r k`` parameters, the router k r
instead of k fan_in. In the (out, in) layout of the paper, ``dW(x) = s B C(A
x) A``. There is no shared core besides the k routed ones.

Checked against the official code, github.com/DCDmllm/CoMoL, where the method
is ``mocorelora`` with ``core_router=True`` (``src/mocorelora/layer.py``,
``LinearMoCoreLoraLayer.forward`` and ``reset_parameters``; ``train.py``):

* Init as there: A ~ U(+-1/sqrt(fan_in)) and every C_i ~ U(+-1/sqrt(r))
  (torch's ``kaiming_uniform_(a=sqrt(5))`` on the (r, fan_in) and (r, r)
  tensors), B = 0 (so the layer equals the base at init), and the router as
  torch's default ``nn.Linear(r, k)`` init, U(+-1/sqrt(r)). The official
  weights map as ``comol_a = lora_A.weight.T``, ``comol_b = lora_B.weight.T``,
  ``comol_cores[i] = lora_Cores[i]`` and ``comol_router = lora_router.weight.T``.
* ``s = alpha / r``; the official scripts set alpha = r (s = 1, our default)
  and dropout 0.1 (ours defaults to 0).
* No load-balancing loss: the official trainer adds an auxiliary loss only for
  models that define ``get_aux_loss`` (its MoLE and AdaMoLE baselines), and
  the CoMoL model does not.

Differences from the official code: it also applies the dropout to the merged
per-token core and to ``z C(z)`` before B; here dropout acts on the input
only (as in its shared-subspace variant ``mocorelorash`` and in PEFT's LoRA),
so the per-token (r, r) core is never formed. ``top_k`` (keep each token's
top-k gates, renormalized) is an option of ours; the official router is dense
(``top_k=None``, the default).

Merging: the update depends on the input through the gates, so no single
kernel equals the adapted layer. The adapter is therefore not mergeable
(``mergeable = False``): `lrj.merge`, `delta` and `effective_kernel` raise a
clear error instead of silently dropping the routed part. `delta_for_gates`
gives the update for fixed gate weights, e.g. to export a layer specialized
to one expert mixture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters import layers
from lowrank_jax.adapters import products

Array = jax.Array


def route(z: Array, router: Array, top_k: int | None) -> Array:
  """Gate weights (..., k) from rank-space activations z (..., r), float32.

  ``softmax(z W_g)``; with ``top_k`` the softmax over the top-k logits only
  (the others get weight 0).
  """
  logits = z.astype(jnp.float32) @ router.astype(jnp.float32)
  if top_k is not None and top_k < logits.shape[-1]:
    threshold = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def mix_cores(z: Array, gates: Array, cores: Array) -> Array:
  """``z sum_i g_i C_i`` per token without forming the per-token core:
  z (..., r), gates (..., k), cores (k, r, r) -> (..., r)."""
  return jnp.einsum("...k,...r,krs->...s", gates.astype(z.dtype), z, cores.astype(z.dtype))


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class CoMoLSpec(adapter_base.AdapterSpec):
  """Hyperparameters of the rank-space mixture (see the module docstring).

  Attributes:
    rank: r >= 1.
    experts: number of expert cores k >= 1.
    alpha: scaling numerator; None means alpha = r (s = 1).
    top_k: None routes densely (the soft merge of all cores, as the paper);
      an integer in [1, experts] keeps each token's top-k gates (ours).
    dropout: dropout rate on the adapter input, in [0, 1).
    param_dtype: dtype of the adapter leaves; None uses the base kernel's.
  """

  name = "comol"
  rank: int = 8
  experts: int = 4
  alpha: float | None = None
  top_k: int | None = None
  dropout: float = 0.0
  param_dtype: Any = None

  def __post_init__(self):
    layers.check_positive_int(self.name, "rank", self.rank)
    layers.check_positive_int(self.name, "experts", self.experts)
    layers.check_positive_int(self.name, "top_k", self.top_k, allow_none=True)
    if self.top_k is not None and self.top_k > self.experts:
      raise ValueError(f"{self.name}: top_k={self.top_k} exceeds experts={self.experts}.")
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"{self.name}: alpha must be > 0 or None, got {self.alpha!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout!r}.")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def build(self, base, *, rngs, calibration=None, path=""):
    del calibration
    return CoMoL(base, self, layers.view_of(base, path), path, rngs=rngs)

  def num_params(self, fan_in: int, fan_out: int) -> int:
    r, k = self.rank, self.experts
    return r * (fan_in + fan_out) + k * r * r + r * k


class CoMoL(adapter_base.Adapter):
  """The rank-space mixture adapter. Leaves ``comol_a`` (fan_in, r), ``comol_b``
  (r, fan_out), ``comol_cores`` (k, r, r), ``comol_router`` (r, k)."""

  additive = False  # there is no fixed delta to add or subtract
  mergeable = False

  def __init__(self, base, spec: CoMoLSpec, view, path="", *, rngs: nnx.Rngs):
    super().__init__(base, spec, view, path)
    dtype = products.param_dtype(spec, base)
    r, k = spec.rank, spec.experts
    sharding = adapter_base.sharding_for_factors(base, view)
    param = adapter_base.AdapterParam
    key_a, key_cores, key_router = jax.random.split(rngs.params(), 3)
    a = products.uniform_fan_in(key_a, (view.fan_in, r), view.fan_in)
    self.comol_a = param(a.astype(dtype), **sharding["a"])
    self.comol_b = param(jnp.zeros((r, view.fan_out), dtype), **sharding["b"])
    self.comol_cores = param(products.uniform_fan_in(key_cores, (k, r, r), r).astype(dtype))
    self.comol_router = param(products.uniform_fan_in(key_router, (r, k), r).astype(dtype))
    self.dropout = nnx.Dropout(spec.dropout, rngs=rngs) if spec.dropout > 0 else None

  def rank_activations(self, x: Array, **kwargs) -> Array:
    """``z = dropout(x) A`` (..., r) through the base layer's contraction."""
    x = self.dropout(x) if self.dropout is not None else x
    return self.view.project_in(self.base, x, self.comol_a[...], **kwargs)

  def gates(self, x: Array, **kwargs) -> Array:
    """Per-token gate weights (..., k) for input x."""
    return route(self.rank_activations(x, **kwargs), self.comol_router[...], self.spec.top_k)

  def adapter_forward(self, x, **kwargs):
    y = self.base(x, **kwargs)
    z = self.rank_activations(x, **kwargs)
    gates = route(z, self.comol_router[...], self.spec.top_k)
    h = mix_cores(z, gates, self.comol_cores[...])
    return y + self.view.project_out(self.spec.scale * h, self.comol_b[...]).astype(y.dtype)

  def delta_for_gates(self, gates: Array) -> Array:
    """The (fan_in, fan_out) update ``s A (sum_i g_i C_i) B`` for fixed gates (k,)."""
    f32 = lambda v: v[...].astype(jnp.float32)
    core = jnp.einsum("k,krs->rs", gates.astype(jnp.float32), f32(self.comol_cores))
    return self.spec.scale * (f32(self.comol_a) @ core @ f32(self.comol_b))

  def delta_matrix(self):
    self.check_mergeable()

  def effective_matrix(self):
    self.check_mergeable()

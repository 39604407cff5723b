"""Registered methods that are configurations of the three-factor adapter.

Each spec below only changes defaults of `FactoredSpec` (every option stays
available). Formulas are in a paper's (out, in) layout ``W``; our
(fan_in, fan_out) layout has ``W0 = W^T``, ``a = A^T``, ``core = M^T``,
``b = B^T`` (see `lowrank_jax.adapters.factored`).
"""

from __future__ import annotations

import dataclasses

from lowrank_jax.adapters import base as adapter_base
from lowrank_jax.adapters.factored import FactoredSpec


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoRAXSSpec(FactoredSpec):
  """LoRA-XS: ``W = W0 + s (U_r S_r) R V_r^T``, only the r x r ``R`` trained.

  "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
  Parameters" (2024). U_r S_r and V_r^T come from the truncated SVD of W0 and
  are frozen; W0 is not residualized. The reference code takes the SVD of
  ``W^T`` (our W0), absorbs S into the encoder (our ``a = U_r S_r``) and keeps
  PEFT's ``alpha / r`` scale. Differences: the reference initializes
  ``R ~ N(0, 1e-5^2)``; our default R = 0 makes the start exact
  (``core_init='gaussian'`` gives the reference's). ``init='svd_bottom'`` is
  the reference's ``retain_part='bottom'``.
  """

  name = "lora_xs"
  sigma: str = "a"


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoRASBSpec(FactoredSpec):
  """LoRA-SB: LoRA-XS's ``W0 + s B R A`` with B, A from the approximate first update.

  "Initialization Using Update Approximation is a Silver
  Bullet for Extremely Efficient Low-Rank Fine-Tuning" (2024). With G the
  calibration gradient of the loss w.r.t. W0 (``calibrate.site_stats(...,
  'grad')``), the first full fine-tuning (Adam/sign) step is approximated
  by ``dW = -lr sign(G)`` (the reference's ``-lr * sign(sum of grads)``);
  its truncated SVD ``U_r S_r V_r^T`` gives ``B = U_r``, ``A = V_r^T``
  (orthonormal, frozen) and ``R = S_r`` (trained), so the adapter starts
  with the rank-r part of the approximate update applied. Training R then
  moves W by ``s^2 B B^T G A^T A`` per unit step: the projection of the full
  gradient onto the fixed subspaces (tested). Differences: R = S_r with no
  1/s rescale, and W0 is not compensated (``residual=True`` compensates), both
  unverified against the reference (its init function is not public in the
  code we read); the mean gradient replaces the sum (the sign is the same).
  The reference's GLUE script sets the approximation's lr to
  ``lr / (warmup_ratio * total_steps)`` from 2 samples; here it is
  ``update_lr``.
  """

  name = "lora_sb"
  init: str = "gradient_svd"
  core_init: str = "singular"


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SVFTSpec(FactoredSpec):
  """SVFT: ``W = U (S + M) V^T`` with a sparse trainable M (zero at init).

  "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors" (2024). U, V are the (full by default, ``rank=None``) singular
  vectors of W0, frozen; M has a fixed pattern: 'diagonal' (SVFT-P, the
  default), 'banded' (|i - j| <= core_k), 'random' (as many uniformly placed
  entries as that band has, like the reference code) or 'top_k' (the core_k
  pairs (i, j) with the largest alignment |u_i . v_j|, square layers only).
  Since W0 = U S V^T, the update is ``dW = U M V^T``; S stays in the base
  weight. Differences from the reference code: it initializes M
  kaiming-normal and multiplies it by a trainable gate sigmoid(g), g = 0, so
  its layer does not start at W0; ours has M = 0 and no gate. Its 'random'
  pattern may repeat positions (ours are distinct). Its top-k ranks the signed
  entries of the product U V (square layers) with the band's count, while
  ours ranks the alignment |u_i . v_j| of left and right singular vectors
  (our reading of the paper's top-k pattern) with core_k entries. A truncated ``rank`` keeps the remaining spectrum in W0 (the
  reference can instead fill the basis with random orthonormal vectors).
  """

  name = "svft"
  rank: int | None = None
  core: str = "diagonal"


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SVFitSpec(FactoredSpec):
  """SVFit: ``W = W_res + U_r diag(sigma) V_r^T``, only the top-r singular values trained.

  "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained
  Models Using Singular Values" (2024). sigma starts at S_r, U_r and V_r^T
  and ``W_res = W0 - U_r S_r V_r^T`` are frozen. Difference: the paper picks r
  by a 99% energy criterion; here r is given.
  """

  name = "svfit"
  core: str = "diagonal"
  core_init: str = "singular"
  residual: bool = True


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class VectorFitSpec(FactoredSpec):
  """VectorFit: ``W = U diag(sigma) V^T`` over the full SVD, with sigma and the bias trained.

  "VectorFit: Adaptive Singular & Bias Vector Fine-Tuning of
  Pre-trained Foundation Models" (2025). Differences: the paper's Adaptive
  Vector Freezing schedule is not implemented (freeze with an optax mask);
  the bias is trained as a delta added to the frozen base bias.
  """

  name = "vectorfit"
  rank: int | None = None
  core: str = "diagonal"
  core_init: str = "singular"
  residual: bool = True
  train: tuple[str, ...] = ("core", "bias")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SORSASpec(FactoredSpec):
  """SORSA: ``W = W_res + s U_p diag(sigma_p) V_p^T``, U_p, sigma_p, V_p all trained.

  "SORSA: Singular Values and Orthonormal Regularized Singular Vectors
  Adaptation of Large Language Models" (2024). Initialized from the top-r SVD
  of W0 with ``W_res = W0 - s U_p S_p V_p^T`` frozen; the loss adds
  ``gamma (||U_p^T U_p - I||_F + ||V_p V_p^T - I||_F)``
  (`lowrank_jax.adapters.regularizers.orthogonality`, non-squared Frobenius
  norms averaged over adapted matrices as in the reference code). Our
  ``a = U_p`` is (fan_in, r) and ``b = V_p^T``: the paper's U and V swap
  sides in our layout, the penalty is the same.
  """

  name = "sorsa"
  core: str = "diagonal"
  core_init: str = "singular"
  residual: bool = True
  train: tuple[str, ...] = ("a", "core", "b")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class EDoRASpec(FactoredSpec):
  """EDoRA: ``W' = m (W0 + s B R A) / ||W0 + s B R A||_c``, only m and the r x r R trained.

  "EDoRA: Efficient Weight-Decomposed Low-Rank
  Adaptation via Singular Value Decomposition" (2025). B, A are the frozen
  truncated-SVD factors of W0 (S absorbed into our ``a`` as in LoRA-XS), m
  starts at the column norms of W0, R = 0; the DoRA functions of
  `lowrank_jax.adapters.dora` compute the norm from the factors (treated as a
  constant in the backward pass, ``detach_norm``). Differences: the placement
  of S and the zero init of R are not checked against the reference code.
  """

  name = "edora"
  sigma: str = "a"
  magnitude: bool = True
  train: tuple[str, ...] = ("core", "magnitude")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class NLoRASpec(FactoredSpec):
  """NLoRA: ``dW = s B N A`` with B, N, A read from W0 (Nystrom), all trained.

  "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large
  Language Models" (2025). As in the released code: ``A = W[:r, :]``,
  ``B = W[:, :r]``, ``N = W[:r, :r]`` (in our layout ``a = W0[:, :r]``,
  ``b = W0[:r, :]``, ``core = W0[:r, :r]``) and W0 is not reduced, so the
  init changes the layer's function (``residual=True`` keeps it). The
  textbook Nystrom core ``pinv(W[:r, :r])`` is not used (the code comments it
  out).
  """

  name = "nlora"
  init: str = "nystrom"
  core_init: str = "weight"
  train: tuple[str, ...] = ("a", "core", "b")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SLoRASpec(FactoredSpec):
  """SLoRA: ``dW = s B N A`` with kaiming A and N and B = 0, all trained.

  The three-matrix baseline of "NLoRA: Nystrom-Initiated Low-Rank
  Adaptation for Large Language Models" (2025), initialized as in its code.
  """

  name = "slora"
  init: str = "kaiming"
  core_init: str = "kaiming"
  train: tuple[str, ...] = ("a", "core", "b")


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class IntTuneSpec(FactoredSpec):
  """IntTune: NLoRA's ``s B N A`` with only the r x r N trained.

  "NLoRA: Nystrom-Initiated Low-Rank Adaptation for Large
  Language Models" (2025). Nystrom init as `NLoRASpec` (not function
  preserving unless ``residual=True``).
  """

  name = "inttune"
  init: str = "nystrom"
  core_init: str = "weight"


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class PMSSSpec(FactoredSpec):
  """PMSS: ``dW = C U R`` with C, R frozen columns/rows of W0 and the r x r U trained.

  "PMSS: Pretrained Matrices Skeleton Selection for LLM
  Fine-tuning" (2024). The skeleton is picked by column-pivoted QR of W0 (r
  output features, our ``a = W0[:, J]``) and of W0^T (r input features,
  ``b = W0[I, :]``); U = 0. Differences: the paper's selection criterion and
  the init of U are not checked against its code (pivoted QR is one
  standard CUR skeleton).
  """

  name = "pmss"
  init: str = "skeleton"


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoRAMiniSpec(FactoredSpec):
  """LoRA-Mini: ``dW = A_aux A_tr B_tr B_aux``, outer auxiliaries frozen, inner trained.

  "LoRA-Mini: Adaptation Matrices Decomposition and Selective
  Training" (2024). In our layout ``a = A_aux`` (fan_in, k) and
  ``b = B_aux`` (k, fan_out) are frozen random (N(0, 1/fan_in),
  N(0, 1/k)), the core is ``core_left (k, q) @ core_right (q, k)`` with q =
  core_rank, core_left kaiming and core_right = 0. Differences: the paper
  allows different outer widths for A and B (here both k = rank) and its
  auxiliary init is not checked against its code.
  """

  name = "lora_mini"
  rank: int | None = 6
  init: str = "random"
  core: str = "lowrank"


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class AsymmetricLoRASpec(FactoredSpec):
  """B-only LoRA: ``dW = s B A_rand`` with A a frozen random orthogonal matrix, B = 0 trained.

  "Asymmetry in Low-Rank Adapters of Foundation Models" (2024).
  Our ``a`` (fan_in, r) has orthonormal columns (the paper's A has
  orthonormal rows). ``init='gaussian'`` gives the paper's Gaussian variant.
  """

  name = "lora_asym"
  init: str = "orthogonal"
  core: str = "identity"
  train: tuple[str, ...] = ("b",)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class SingLoRASpec(FactoredSpec):
  """SingLoRA: ``dW = (alpha / r) u(t) A A*^T`` with one trained matrix A.

  "SingLoRA: Low Rank Adaptation Using a Single Matrix"
  (2025). A is (max(fan_in, fan_out), r), kaiming-uniform; ``A* = A[:d]`` for
  the smaller side, i.e. our ``dW = a[:fan_in] @ a[:fan_out]^T``. The ramp
  ``u(t) = min(t / T, 1)`` needs the step t, set by `factored.set_step` or
  `factored.RampEvent`. Difference: the default ``ramp_steps=0`` means
  u = 1 from the start (so the layer does not start at W0); the paper's ramp
  is ``ramp_steps=T``, with which dW = 0 and A gets no gradient until t > 0.
  """

  name = "singlora"
  init: str = "kaiming"
  core: str = "identity"
  tie: bool = True
  train: tuple[str, ...] = ("a",)


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class LoRADropoutSpec(FactoredSpec):
  """LoRA Dropout: ``dW = s (B * M_B)(A * M_A)`` with Bernoulli masks on the factors.

  "LoRA Dropout as a Sparsity Regularizer for Overfitting
  Control" (2024). In training each forward draws fresh masks on the entries
  of both factors (keep 1 - p, inverted scaling); in evaluation the update
  is the mean over ``ensemble`` fixed masked copies (the test-time ensemble,
  mergeable since it is a linear map), or the plain factors with
  ``ensemble=0``. Differences: the paper's ensemble averages outputs of
  freshly sampled masks; ours are drawn once at build so that evaluation is
  deterministic and merges exactly. Init as PEFT's LoRA (kaiming A, B = 0).
  """

  name = "lora_dropout"
  init: str = "kaiming"
  core: str = "identity"
  train: tuple[str, ...] = ("a", "b")
  factor_dropout: float = 0.1
  ensemble: int = 4


@adapter_base.register
@dataclasses.dataclass(frozen=True)
class CapaBoostSpec(FactoredSpec):
  """CapaBoost: ``dW = s sum_i (M_i^B * B)(M_i^A * A)`` with static random masks.

  "Increasing Model Capacity for Free: A Simple Strategy for
  Parameter Efficient Fine-tuning" (2024). One shared (A, B) pair seen through
  ``mask_copies`` fixed Bernoulli(mask_density) masks raises the rank of the
  update to up to ``copies * r`` at the parameter count of one LoRA. Init as
  PEFT's LoRA. Difference: masks are not rescaled (the paper's masked
  copies; rescale alpha to compensate).
  """

  name = "capaboost"
  init: str = "kaiming"
  core: str = "identity"
  train: tuple[str, ...] = ("a", "b")
  mask_copies: int = 2

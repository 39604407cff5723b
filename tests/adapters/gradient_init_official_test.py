"""LoRA-GA and LoRA-One inits against the formulas of their official code.

The references below restate, in torch and the (out, in) layout of
``nn.Linear.weight``, what Outsider565/LoRA-GA (``reinit_lora_modules``,
``direction='ArB2r'``, ``scale='stable'``) and YuanheZ/LoRA-One
(``direction='LoRA-One'``, ``scale='stable'``) do with the mean gradient G:
which singular vectors go to A and B, the scaling with gamma, the default
gamma and whether W0 is compensated. ``torch.svd_lowrank`` is called as
there, with q = min(G.shape) so that it is exact on these small matrices.
"""

import jax
import numpy as np
import pytest
import torch

from lowrank_jax.adapters import init as lora_init

OUT, IN, RANK, ALPHA = 12, 16, 3, 6.0
SCALE = ALPHA / RANK


def _problem(seed):
  rng = np.random.default_rng(seed)
  grad = rng.standard_normal((OUT, IN)).astype(np.float32)      # (out, in), as torch
  w0 = rng.standard_normal((OUT, IN)).astype(np.float32)
  return grad, w0


def _svd(matrix):
  torch.manual_seed(0)
  u, s, v = torch.svd_lowrank(torch.from_numpy(matrix).double(), q=min(matrix.shape), niter=16)
  return u, s, v.T


def official_lora_ga(grad, r, gamma=16.0):
  """Outsider565/LoRA-GA: B = U[:, r:2r], A = V[:r] (V = right vectors as rows), both times
  out^(1/4)/sqrt(gamma); the official code then sets W0 <- W0 - scaling B A."""
  u, _, v = _svd(grad)
  m = grad.shape[0]
  b = u[:, r:2 * r] * m ** 0.25 / gamma ** 0.5
  a = v[:r, :] * m ** 0.25 / gamma ** 0.5
  return a.numpy(), b.numpy()


def official_lora_one(grad, r, gamma=128.0):
  """YuanheZ/LoRA-One: SVD of -G; B = U_r sqrt(S_r)/sqrt(S_0), A = sqrt(S_r) V_r/sqrt(S_0), both
  divided by sqrt(gamma); W0 unchanged."""
  u, s, v = _svd(-grad)
  root = torch.sqrt(s[:r]) / torch.sqrt(s[0])
  b = u[:, :r] @ torch.diag(root) / gamma ** 0.5
  a = torch.diag(root) @ v[:r, :] / gamma ** 0.5
  return a.numpy(), b.numpy()


def _ours(init, grad, w0):
  """Our factors for the (fan_in, fan_out) layout, with the init's default gamma and compensation."""
  factors = lora_init.gradient_factors(init, jax.random.key(0), w0.T, grad.T, RANK, SCALE, ALPHA,
                                       None, None)
  return (np.asarray(factors.a, np.float64), np.asarray(factors.b, np.float64),
          None if factors.residual is None else np.asarray(factors.residual, np.float64))


@pytest.mark.parametrize("seed", [0, 1])
def test_lora_ga_matches_the_official_code(seed):
  grad, w0 = _problem(seed)
  a_ref, b_ref = official_lora_ga(grad, RANK)
  a, b, residual = _ours("lora_ga", grad, w0)
  # a = A^T, b = B^T up to the sign of each singular vector; align the signs, then compare.
  signs_a = np.sign(np.sum(a * a_ref.T, axis=0))
  signs_b = np.sign(np.sum(b * b_ref.T, axis=1))
  np.testing.assert_allclose(a, a_ref.T * signs_a[None, :], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(b, b_ref.T * signs_b[:, None], rtol=1e-4, atol=1e-5)
  assert residual is not None  # compensated by default, as the official code always is
  w_ref_aligned = w0 - SCALE * ((b_ref.T * signs_b[:, None]).T @ (a_ref.T * signs_a[None, :]).T)
  np.testing.assert_allclose(residual, w_ref_aligned.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.full(RANK, OUT ** 0.25 / 4.0), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_lora_one_matches_the_official_code(seed):
  grad, w0 = _problem(seed)
  a_ref, b_ref = official_lora_one(grad, RANK)
  a, b, residual = _ours("lora_one", grad, w0)
  # The product and each factor's Gram matrix do not depend on singular-vector signs.
  np.testing.assert_allclose(a @ b, (b_ref @ a_ref).T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(a @ a.T, a_ref.T @ a_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(b.T @ b, b_ref @ b_ref.T, rtol=1e-4, atol=1e-6)
  assert residual is None  # the official code leaves W0 unchanged


def test_a_different_gamma_is_detected():
  """The comparison can fail: the previous default gamma (64) does not match the official 128."""
  grad, w0 = _problem(0)
  a_ref, b_ref = official_lora_one(grad, RANK, gamma=64.0)
  a, b, _ = _ours("lora_one", grad, w0)
  assert np.abs(a @ b - (b_ref @ a_ref).T).max() > 1e-3

"""newton_schulz: the fused Pallas step (interpreted) and XLA against linalg.newton_schulz."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank_jax import linalg
from lowrank_jax.kernels import newton_schulz as ns

import kernel_testing

SMALL_BLOCKS = ns.BlockSizes(block_m=128, block_n=128, block_k=128)


def _x(seed, m, n, dtype):
  return jax.random.normal(jax.random.key(seed), (m, n)).astype(dtype)


def _step_reference(x, a, b, c):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  gram = x @ x.T
  return a * x + (b * gram + c * gram @ gram) @ x


# m (the Gram side) from 1 to 2 tiles of 128 and n across a tile boundary.
@settings(max_examples=3, deadline=None)
@given(m=st.sampled_from([5, 136]), n=st.sampled_from([7, 140, 260]), seed=st.integers(0, 2**16))
def test_pallas_step_matches_reference(m, n, seed):
  x = _x(seed, m, n, jnp.float32) / (m * n) ** 0.25
  a, b, c = linalg.NEWTON_SCHULZ_COEFFS["muon"]
  y = ns.newton_schulz_step(x, a, b, c, implementation="pallas", block_sizes=SMALL_BLOCKS,
                            interpret=True)
  kernel_testing.assert_close(y, _step_reference(x, a, b, c), jnp.float32, "step")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("shape,steps,coeffs", [((136, 40), 2, "muon"), ((30, 150), 3, "cubic")])
def test_matches_linalg_newton_schulz(implementation, shape, steps, coeffs):
  x = _x(1, *shape, jnp.float32)
  y = ns.newton_schulz(x, steps=steps, coeffs=coeffs, implementation=implementation,
                       block_sizes=SMALL_BLOCKS, interpret=True)
  want = linalg.newton_schulz(x, steps=steps, coeffs=coeffs)
  kernel_testing.assert_close(y, want, jnp.float32, "newton_schulz")


def test_bfloat16_iterates_close_to_float32():
  x = _x(2, 20, 136, jnp.bfloat16)
  y = ns.newton_schulz(x, steps=5, implementation="pallas", block_sizes=SMALL_BLOCKS,
                       interpret=True)
  assert y.dtype == jnp.bfloat16
  kernel_testing.assert_close(y, linalg.newton_schulz(x.astype(jnp.float32)), jnp.bfloat16, "ns")


def test_cubic_iteration_orthogonalizes():
  x = _x(3, 12, 40, jnp.float32)
  x = x / jnp.linalg.norm(x, ord=2) * 1.2  # singular values in the cubic's basin
  y = ns.newton_schulz(x, steps=30, coeffs="cubic")
  np.testing.assert_allclose(y @ y.T, np.eye(12), atol=1e-4)


def test_bad_inputs():
  with pytest.raises(ValueError, match="2 dims"):
    ns.newton_schulz(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="steps"):
    ns.newton_schulz(jnp.ones((3, 4)), steps=0)
  with pytest.raises(ValueError, match="unknown coeffs"):
    ns.newton_schulz(jnp.ones((3, 4)), coeffs="quartic")
  with pytest.raises(TypeError, match="int32"):
    ns.newton_schulz(jnp.ones((3, 4), jnp.int32))

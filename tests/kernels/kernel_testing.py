"""Tolerances and helpers shared by the kernel tests.

Tolerances (max |actual - reference| / max |reference|, the reference in
float32 from the same inputs): float32 1e-5 (summation order only); bfloat16
3e-2 (inputs, the rank-r activations and the output rounded to bfloat16, eps
7.8e-3, with float32 accumulation).

Poisoning: the Pallas interpreter fills every output buffer with NaN before the
kernel runs, so a block the kernel never writes comes back as NaN;
`assert_close` checks that no NaN survives (the inputs are finite), and
`test_interpreter_poisons_unwritten_blocks` checks that the interpreter still
does so.
"""

import jax.numpy as jnp
import numpy as np

RELATIVE_TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def assert_close(actual, reference, dtype, what=""):
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  reference = np.asarray(jnp.asarray(reference, jnp.float32))
  assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
  assert not np.isnan(actual).any(), f"{what}: NaN in the output (an unwritten block?)"
  scale = float(np.abs(reference).max()) + 1e-30
  error = float(np.abs(actual - reference).max()) / scale
  assert error <= RELATIVE_TOLERANCE[jnp.dtype(dtype)], f"{what}: relative error {error:.3g}"

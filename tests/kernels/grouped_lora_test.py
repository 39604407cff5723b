"""grouped_lora against a per-row loop over single-adapter LoRA, forward and vjp."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank_jax.kernels import grouped_lora as gl
from lowrank_jax.kernels import lora_matmul as lm

import kernel_testing

SMALL_BLOCKS = lm.BlockSizes(block_m=8, block_n=128, block_k=128)


def _inputs(seed, rows, fan_in, fan_out, rank, groups, dtype):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (rows, fan_in))
  w0 = jax.random.normal(ks[1], (fan_in, fan_out)) / fan_in**0.5
  a = jax.random.normal(ks[2], (groups, fan_in, rank)) / fan_in**0.5
  b = jax.random.normal(ks[3], (groups, rank, fan_out))
  g = jax.random.normal(ks[4], (rows, fan_out))
  ids = jax.random.randint(ks[5], (rows,), -1, groups)
  scales = tuple(0.5 + 0.25 * i for i in range(groups))
  return [t.astype(dtype) for t in (x, w0, a, b, g)] + [ids, scales]


def _per_row_loop(x, w0, a, b, ids, scales):
  """Row by row in float64 numpy: x_m W0 + s_g (x_m A_g) B_g, or x_m W0 for id -1."""
  x, w0, a, b = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (x, w0, a, b))
  rows = []
  for m, g in enumerate(np.asarray(ids).tolist()):
    y = x[m] @ w0
    if g >= 0:
      y = y + scales[g] * ((x[m] @ a[g]) @ b[g])
    rows.append(y)
  return np.stack(rows)


def _check(implementation, seed, rows, fan_in, fan_out, rank, groups, dtype):
  x, w0, a, b, g, ids, scales = _inputs(seed, rows, fan_in, fan_out, rank, groups, dtype)
  fn = lambda x, w0, a, b: gl.grouped_lora(x, w0, a, b, ids, scales=scales,
                                           implementation=implementation,
                                           block_sizes=SMALL_BLOCKS, interpret=True)
  y, vjp = jax.vjp(fn, x, w0, a, b)
  assert y.dtype == dtype
  kernel_testing.assert_close(y, _per_row_loop(x, w0, a, b, ids, scales), dtype, "y")
  f32 = [t.astype(jnp.float32) for t in (x, w0, a, b)]
  _, vjp_ref = jax.vjp(lambda *t: gl.reference(*t, ids, scales), *f32)
  for name, got, want in zip(("dx", "dw0", "da", "db"), vjp(g), vjp_ref(g.astype(jnp.float32))):
    kernel_testing.assert_close(got, want, dtype, name)


shapes = st.tuples(st.integers(1, 16), st.sampled_from([16, 130]), st.sampled_from([24, 136]),
                   st.integers(1, 4), st.integers(1, 5))


@settings(max_examples=3, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_pallas_matches_per_row_loop_float32(shape, seed):
  _check("pallas", seed, *shape, jnp.float32)


@settings(max_examples=2, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_pallas_matches_per_row_loop_bfloat16(shape, seed):
  _check("pallas", seed, *shape, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 24, 1, 1), (19, 130, 136, 4, 3), (33, 64, 40, 8, 16)])
def test_xla_matches_per_row_loop(shape, dtype):
  _check("xla", 1, *shape, dtype)


def test_one_adapter_equals_lora_matmul():
  x, w0, a, b, _, _, _ = _inputs(2, 9, 16, 24, 3, 1, jnp.float32)
  y = gl.grouped_lora(x, w0, a, b, jnp.zeros((9,), jnp.int32), scales=1.5)
  np.testing.assert_allclose(y, lm.lora_matmul(x, w0, a[0], b[0], scale=1.5), rtol=1e-6, atol=1e-6)


def test_ids_per_sequence_broadcast_over_tokens():
  x, w0, a, b, _, _, scales = _inputs(3, 12, 16, 24, 2, 3, jnp.float32)
  x3 = x.reshape(3, 4, 16)
  ids = jnp.array([2, -1, 0])
  y = gl.grouped_lora(x3, w0, a, b, ids, scales=scales)
  want = _per_row_loop(x, w0, a, b, jnp.repeat(ids, 4), scales).reshape(3, 4, 24)
  kernel_testing.assert_close(y, want, jnp.float32, "y")


def test_bad_inputs_raise_before_launch():
  x, w0, a, b, _, ids, scales = _inputs(4, 6, 16, 24, 2, 3, jnp.float32)
  with pytest.raises(ValueError, match=r"in \[-1, 3\).*\[3, 7\]"):
    gl.grouped_lora(x, w0, a, b, jnp.array([0, 3, 1, 7, 0, 0]), scales=scales)
  with pytest.raises(ValueError, match="prefix"):
    gl.grouped_lora(x, w0, a, b, ids[:5], scales=scales)
  with pytest.raises(TypeError, match="integers"):
    gl.grouped_lora(x, w0, a, b, ids.astype(jnp.float32), scales=scales)
  with pytest.raises(ValueError, match="same G"):
    gl.grouped_lora(x, w0, a, b[:2], ids, scales=scales)
  with pytest.raises(ValueError, match="3 floats"):
    gl.grouped_lora(x, w0, a, b, ids, scales=(1.0, 2.0))
  with pytest.raises(TypeError, match="float64|int8"):
    gl.grouped_lora(x.astype(jnp.int8), w0, a, b, ids, scales=scales)


def test_traced_out_of_range_ids_give_nan_rows():
  x, w0, a, b, _, _, scales = _inputs(5, 4, 16, 24, 2, 3, jnp.float32)
  y = jax.jit(lambda ids: gl.grouped_lora(x, w0, a, b, ids, scales=scales))(jnp.array([0, 3, -1, -2]))
  nan_rows = np.isnan(np.asarray(y)).all(axis=1)
  assert nan_rows.tolist() == [False, True, False, True]

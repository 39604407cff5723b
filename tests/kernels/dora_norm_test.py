"""dora_norm: Pallas (interpreted) and XLA against the materialized norm, forward and vjp."""

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from lowrank_jax.adapters.dora import dora_column_norm
from lowrank_jax.kernels import dora_norm as dn

import kernel_testing

SMALL_BLOCKS = dn.BlockSizes(block_n=128, block_k=64)


def _inputs(seed, fan_in, fan_out, rank, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  w0 = jax.random.normal(ks[0], (fan_in, fan_out)) / fan_in**0.5
  a = jax.random.normal(ks[1], (fan_in, rank)) / fan_in**0.5
  b = jax.random.normal(ks[2], (rank, fan_out))
  g = jax.random.normal(ks[3], (fan_out,))
  return [t.astype(dtype) for t in (w0, a, b)] + [g]


def _check(implementation, seed, fan_in, fan_out, rank, dtype):
  w0, a, b, g = _inputs(seed, fan_in, fan_out, rank, dtype)
  fn = functools.partial(dn.dora_norm, scale=0.8, implementation=implementation,
                         block_sizes=SMALL_BLOCKS, interpret=True)
  n, vjp = jax.vjp(fn, w0, a, b)
  f32 = [t.astype(jnp.float32) for t in (w0, a, b)]
  n_ref, vjp_ref = jax.vjp(lambda *t: dn.reference(*t, 0.8), *f32)
  assert n.dtype == jnp.float32
  kernel_testing.assert_close(n, n_ref, jnp.float32, "norm")
  kernel_testing.assert_close(n, dora_column_norm(*f32, 0.8), jnp.float32, "vs dora")
  for name, got, want in zip(("dw0", "da", "db"), vjp(g), vjp_ref(g)):
    assert got.dtype == dtype, name
    kernel_testing.assert_close(got, want, dtype, name)


shapes = st.tuples(st.sampled_from([8, 70, 130]), st.sampled_from([24, 136, 260]),
                   st.integers(1, 6))


@settings(max_examples=3, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_pallas_matches_reference_float32(shape, seed):
  _check("pallas", seed, *shape, jnp.float32)


@settings(max_examples=2, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_pallas_matches_reference_bfloat16(shape, seed):
  _check("pallas", seed, *shape, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_matches_reference(dtype):
  _check("xla", 0, 70, 136, 4, dtype)


def test_bad_inputs():
  w0, a, b, _ = _inputs(1, 8, 12, 2, jnp.float32)
  with pytest.raises(ValueError, match="same r"):
    dn.dora_norm(w0, a, b[:1])
  with pytest.raises(ValueError, match="fan_in=8"):
    dn.dora_norm(w0, a[:7], b)
  with pytest.raises(TypeError, match="int32"):
    dn.dora_norm(w0.astype(jnp.int32), a, b)

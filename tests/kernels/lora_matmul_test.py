"""lora_matmul: Pallas (interpreted) and XLA against the jnp reference, forward and vjp."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.experimental import pallas as pl

import lowrank_jax as lrj
from lowrank_jax.kernels import lora_matmul as lm

import kernel_testing

SMALL_BLOCKS = lm.BlockSizes(block_m=8, block_n=128, block_k=128)


def _inputs(seed, tokens, fan_in, fan_out, rank, dtype):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (tokens, fan_in))
  w0 = jax.random.normal(ks[1], (fan_in, fan_out)) / fan_in**0.5
  a = jax.random.normal(ks[2], (fan_in, rank)) / fan_in**0.5
  b = jax.random.normal(ks[3], (rank, fan_out))
  g = jax.random.normal(ks[4], (tokens, fan_out))
  return [t.astype(dtype) for t in (x, w0, a, b, g)]


def _check(implementation, seed, tokens, fan_in, fan_out, rank, dtype, merge_weight=None):
  x, w0, a, b, g = _inputs(seed, tokens, fan_in, fan_out, rank, dtype)
  fn = functools.partial(lm.lora_matmul, scale=0.7, implementation=implementation,
                         block_sizes=SMALL_BLOCKS, interpret=True, merge_weight=merge_weight)
  y, vjp = jax.vjp(fn, x, w0, a, b)
  y_ref, vjp_ref = jax.vjp(lambda *t: lm.reference(*t, scale=0.7),
                           *[t.astype(jnp.float32) for t in (x, w0, a, b)])
  assert y.dtype == dtype
  kernel_testing.assert_close(y, y_ref, dtype, "y")
  for name, got, want in zip(("dx", "dw0", "da", "db"), vjp(g), vjp_ref(g.astype(jnp.float32))):
    assert got.dtype == dtype, name
    kernel_testing.assert_close(got, want, dtype, name)


# Shapes straddle the small blocks (8 rows, 128 columns / contraction) on both sides.
shapes = st.tuples(st.integers(1, 20), st.sampled_from([8, 130, 256]),
                   st.sampled_from([24, 136]), st.integers(1, 5))


@settings(max_examples=3, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_pallas_matches_reference_float32(shape, seed):
  _check("pallas", seed, *shape, jnp.float32)


@settings(max_examples=2, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_pallas_matches_reference_bfloat16(shape, seed):
  _check("pallas", seed, *shape, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 24, 1), (17, 130, 136, 4), (40, 256, 300, 16)])
def test_xla_matches_reference(shape, dtype):
  _check("xla", 0, *shape, dtype)


def _out_shapes(jaxpr) -> set:
  """Shapes of every equation output, inner jaxprs (custom_vjp, jit) included."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        shapes |= _out_shapes(inner)
  return shapes


@pytest.mark.parametrize("merge_weight", [True, False])
@pytest.mark.parametrize("shape", [(3, 24, 16, 2), (70, 24, 40, 5)])
def test_xla_merged_and_factored_forms_match_reference(shape, merge_weight):
  _check("xla", 3, *shape, jnp.float32, merge_weight=merge_weight)


def test_merged_weight_cost_rule():
  # tokens (fan_in + fan_out) >= fan_in fan_out, float32 only.
  assert lm.prefers_merged_weight(512, 1024, 1024, jnp.float32)
  assert not lm.prefers_merged_weight(511, 1024, 1024, jnp.float32)
  assert not lm.prefers_merged_weight(4096, 1024, 1024, jnp.bfloat16)
  x, w0, a, b, _ = _inputs(2, 64, 16, 24, 2, jnp.float32)
  kernel_sized = lambda tokens: (16, 24) in _out_shapes(
      jax.make_jaxpr(lambda x: lm.lora_matmul(x[:tokens], w0, a, b))(x).jaxpr)
  assert kernel_sized(64) and not kernel_sized(4)  # 64 * 40 >= 16 * 24 > 4 * 40
  with pytest.raises(ValueError, match="merge_weight=True cannot apply per-row weights"):
    lm.lowrank_linear(x, w0, a, b, row_weights=jnp.ones((64, 2)), merge_weight=True)


def test_leading_dims_and_jit():
  x, w0, a, b, _ = _inputs(1, 12, 16, 24, 3, jnp.float32)
  x3 = x.reshape(3, 4, 16)
  y = jax.jit(lambda x: lm.lora_matmul(x, w0, a, b, scale=2.0))(x3)
  kernel_testing.assert_close(y, lm.reference(x3, w0, a, b, 2.0), jnp.float32, "y")


def test_frozen_base_gets_no_weight_gradient_work():
  """Differentiating x, A, B only: the jaxpr of the backward has no (fan_in, fan_out) product."""
  x, w0, a, b, _ = _inputs(2, 6, 16, 24, 3, jnp.float32)
  loss = lambda x, a, b: jnp.sum(lm.lora_matmul(x, w0, a, b, implementation="xla") ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, a, b)
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
  assert (16, 24) not in shapes


def test_interpreter_poisons_unwritten_blocks():
  """The poisoning the other tests rely on: a block a kernel skips reads back as NaN."""
  def skip_second_block(x_ref, o_ref):
    @pl.when(pl.program_id(0) != 1)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((32, 128))
  out = pl.pallas_call(skip_second_block, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       grid=(4,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)), interpret=True)(x)
  assert np.isnan(np.asarray(out[8:16])).all() and not np.isnan(np.asarray(out[:8])).any()


# -- bad input ---------------------------------------------------------------------

def test_bad_inputs_raise_before_launch():
  x, w0, a, b, _ = _inputs(3, 4, 16, 24, 3, jnp.float32)
  with pytest.raises(ValueError, match="fan_in 16"):
    lm.lora_matmul(x[:, :15], w0, a, b)
  with pytest.raises(ValueError, match="same r"):
    lm.lora_matmul(x, w0, a, b[:2])
  with pytest.raises(ValueError, match="same r"):
    lm.lora_matmul(x, w0, a[:15], b)
  with pytest.raises(TypeError, match="int32"):
    lm.lora_matmul(x.astype(jnp.int32), w0, a, b)
  with pytest.raises(ValueError, match="implementation must be one of"):
    lm.lora_matmul(x, w0, a, b, implementation="triton")
  with pytest.raises(ValueError, match="interpret=True"):
    lm.lora_matmul(x, w0, a, b, implementation="pallas")
  with pytest.raises(ValueError, match="multiple of 128"):
    lm.lora_matmul(x, w0, a, b, implementation="pallas", interpret=True,
                   block_sizes=lm.BlockSizes(block_k=100))


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the default is Pallas on TPU")
def test_default_dispatch_is_xla_off_tpu():
  x, w0, a, b, _ = _inputs(4, 4, 16, 24, 3, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda x: lm.lora_matmul(x, w0, a, b))(x))
  assert "pallas_call" not in jaxpr
  assert "pallas_call" in str(jax.make_jaxpr(
      lambda x: lm.lora_matmul(x, w0, a, b, implementation="pallas", interpret=True))(x))


# -- the LoRA / DoRA adapters on the kernel ----------------------------------------

def _adapted(method, implementation, dtype=jnp.float32, view_path=False, **hp):
  # A custom (but equal) contraction keeps the default implementation on the layer view.
  dot_general = (lambda *a, **k: jax.lax.dot_general(*a, **k)) if view_path else jax.lax.dot_general
  layer = nnx.Linear(20, 12, param_dtype=dtype, dot_general=dot_general, rngs=nnx.Rngs(0))
  layer.bias[...] = jax.random.normal(jax.random.key(5), layer.bias.shape, dtype)
  model = nnx.Dict({"layer": layer})
  spec = lrj.adapters.get(method, rank=3, implementation=implementation, interpret=True, **hp)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(1))
  state = nnx.state(model, lrj.AdapterParam)
  keys = iter(jax.random.split(jax.random.key(7), 8))
  nnx.update(model, jax.tree_util.tree_map(
      lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape, v.dtype), state))
  return model


@pytest.mark.parametrize("method,hp", [("lora", {}), ("lora", {"use_bias": True}),
                                       ("dora", {}), ("dora", {"detach_norm": False})])
@pytest.mark.parametrize("implementation", [None, "xla", "pallas", "auto"])
def test_adapter_with_kernel_matches_view_path(method, hp, implementation):
  x = jax.random.normal(jax.random.key(9), (2, 30, 20))  # 60 tokens: the merged-weight form
  outputs = {}
  for impl, view_path in (("view", True), (implementation, False)):
    model = _adapted(method, None if view_path else impl, view_path=view_path, **hp)
    adapter = model["layer"]
    assert adapter.uses_kernel != view_path
    graphdef, params, rest = nnx.split(model, lrj.AdapterParam, ...)

    def loss(params):
      y = nnx.merge(graphdef, params, rest)["layer"](x)
      return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
    outputs[impl] = (y, grads)
  (y0, g0), (y1, g1) = outputs["view"], outputs[implementation]
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_adapter_kernel_option_errors_name_the_layer():
  conv = nnx.Dict({"conv": nnx.Conv(2, 4, kernel_size=(2, 2), rngs=nnx.Rngs(0))})
  with pytest.raises(ValueError, match="'conv'.*nnx.Linear"):
    lrj.attach(conv, [("conv", lrj.adapters.lora(implementation="xla"))], rngs=nnx.Rngs(1))
  dense = nnx.Dict({"fc": nnx.Linear(8, 8, rngs=nnx.Rngs(0))})
  with pytest.raises(ValueError, match="'fc'.*dropout=0"):
    lrj.attach(dense, [("fc", lrj.adapters.lora(implementation="xla", dropout=0.1))],
               rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="implementation must be one of"):
    lrj.adapters.lora(implementation="fast")


def test_adapter_kernel_refuses_a_custom_dot_general():
  layer = nnx.Linear(8, 8, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k),
                     rngs=nnx.Rngs(0))
  model = nnx.Dict({"fc": layer})
  lrj.attach(model, [("fc", lrj.adapters.lora(rank=2, implementation="xla"))], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="'fc'.*custom dot_general"):
    model["fc"](jnp.ones((2, 8)))

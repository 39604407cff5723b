"""Math of DoRA on fresh random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.adapters.dora import dora_column_norm


def _w(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _attached(spec, fan_in=14, fan_out=9, seed=0):
  layer = nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed))
  layer.kernel[...] = jnp.asarray(_w((fan_in, fan_out), seed + 50))
  layer.bias[...] = jnp.asarray(_w((fan_out,), seed + 51))
  original = np.asarray(layer.kernel[...])
  host = nnx.Dict(layer=layer)
  lrj.attach(host, [("layer", spec)], rngs=nnx.Rngs(seed + 1))
  return host["layer"], original


def test_column_norm_from_factors_equals_dense_norm():
  w0, a, b = _w((20, 7), 1), _w((20, 3), 2), _w((3, 7), 3)
  dense = np.linalg.norm(w0 + 1.7 * a @ b, axis=0)
  np.testing.assert_allclose(dora_column_norm(w0, a, b, 1.7), dense, rtol=1e-5)


@pytest.mark.parametrize("init", ["default", "pissa", "olora"])
def test_magnitude_at_init_is_column_norm_of_original_weight(init):
  adapter, w = _attached(lrj.adapters.dora(rank=3, init=init))
  np.testing.assert_allclose(adapter.magnitude[...], np.linalg.norm(w, axis=0), rtol=1e-5)
  x = jnp.asarray(_w((4, 14), 4))
  # The adapted layer starts at the original function for every LoRA init.
  np.testing.assert_allclose(adapter(x), x @ w + adapter.base.bias[...], rtol=1e-4, atol=1e-4)


def test_forward_equals_the_paper_formula():
  spec = lrj.adapters.dora(rank=3, alpha=6.0)
  adapter, w = _attached(spec)
  adapter.lora_b[...] = jnp.asarray(_w((3, 9), 5))
  adapter.magnitude[...] = jnp.asarray(np.abs(_w((9,), 6)) + 0.5)
  a, b, m = (np.asarray(v[...]) for v in (adapter.lora_a, adapter.lora_b, adapter.magnitude))
  direction = w + 2.0 * a @ b
  w_prime = m * direction / np.linalg.norm(direction, axis=0)
  x = _w((5, 14), 7)
  expected = x @ w_prime + np.asarray(adapter.base.bias[...])
  np.testing.assert_allclose(adapter(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(adapter.effective_kernel(), w_prime, rtol=1e-5, atol=1e-5)


def test_dropout_follows_peft_formula():
  # PEFT: y = base(x) + (g - 1) x_d W0 + g s (x_d A) B, with g = m / ||W0 + sBA||.
  spec = lrj.adapters.dora(rank=2, dropout=0.5)
  adapter, w = _attached(spec)
  adapter.lora_b[...] = jnp.asarray(_w((2, 9), 8))
  x = jnp.asarray(_w((32, 14), 9))
  adapter.train()
  twin = nnx.clone(adapter)  # same dropout random state: replays the same mask
  y = adapter(x)
  x_d = twin.dropout(x)
  assert float(jnp.abs(x_d - x).max()) > 0
  a, b, m = adapter.lora_a[...], adapter.lora_b[...], adapter.magnitude[...]
  g = m / jnp.linalg.norm(w + a @ b, axis=0)
  expected = x @ w + adapter.base.bias[...] + (g - 1) * (x_d @ w) + g * ((x_d @ a) @ b)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_norm_controls_the_gradient_through_the_norm(detach):
  spec = lrj.adapters.dora(rank=2, detach_norm=detach)
  adapter, w = _attached(spec)
  adapter.lora_b[...] = jnp.asarray(_w((2, 9), 10))
  x = jnp.asarray(_w((6, 14), 11))
  a, m, bias = adapter.lora_a[...], adapter.magnitude[...], adapter.base.bias[...]

  def reference(b):
    direction = w + a @ b
    norm = jnp.linalg.norm(direction, axis=0)
    norm = jax.lax.stop_gradient(norm) if detach else norm
    return jnp.sum((x @ (m * direction / norm) + bias) ** 2)

  def ours(adapter):
    return jnp.sum(adapter(x) ** 2)

  grads = nnx.grad(ours, argnums=nnx.DiffState(0, lrj.AdapterParam))(adapter)
  b = adapter.lora_b[...]
  np.testing.assert_allclose(grads["lora_b"][...], jax.grad(reference)(b), rtol=1e-4, atol=1e-4)

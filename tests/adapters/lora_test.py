"""Math of LoRA and its initializations, on fresh random weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.adapters import init as lora_init


def _w(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _attached(spec, fan_in=16, fan_out=12, seed=0):
  layer = nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed))
  layer.kernel[...] = jnp.asarray(_w((fan_in, fan_out), seed + 100))
  original = np.asarray(layer.kernel[...])
  host = nnx.Dict(layer=layer)
  lrj.attach(host, [("layer", spec)], rngs=nnx.Rngs(seed + 1))
  return host["layer"], original


def test_scale_plain_and_rslora():
  assert lrj.adapters.lora(rank=4, alpha=8).scale == 2.0
  assert lrj.adapters.lora(rank=4, alpha=8, rslora=True).scale == 4.0
  assert lrj.adapters.lora(rank=4).scale == 1.0


def test_default_init_is_peft_kaiming_uniform_with_zero_b():
  adapter, _ = _attached(lrj.adapters.lora(rank=64), fan_in=400, fan_out=12)
  a = np.asarray(adapter.lora_a[...])
  bound = 1 / math.sqrt(400)
  assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.95 * bound
  assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(-b, b) has std b/sqrt(3)
  np.testing.assert_array_equal(adapter.lora_b[...], 0.0)


def test_gaussian_init_std_is_one_over_rank():
  adapter, _ = _attached(lrj.adapters.lora(rank=8, init="gaussian"), fan_in=512, fan_out=12)
  a = np.asarray(adapter.lora_a[...])
  assert abs(a.std() - 1 / 8) < 0.01
  np.testing.assert_array_equal(adapter.lora_b[...], 0.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_residual_plus_update_is_original_and_update_is_top_r(rslora):
  spec = lrj.adapters.lora(rank=3, alpha=5.0, init="pissa", rslora=rslora)
  adapter, w = _attached(spec)
  w_res = np.asarray(adapter.base.kernel[...])
  update = spec.scale * np.asarray(adapter.lora_a[...]) @ np.asarray(adapter.lora_b[...])
  np.testing.assert_allclose(w_res + update, w, atol=1e-5)
  u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(update, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)
  # The factors split the singular values evenly: A^T A = B B^T = S_r / s.
  a, b = np.asarray(adapter.lora_a[...]), np.asarray(adapter.lora_b[...])
  np.testing.assert_allclose(a.T @ a, np.diag(s[:3] / spec.scale), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(b @ b.T, np.diag(s[:3] / spec.scale), rtol=1e-4, atol=1e-4)


def _decaying(decay, seed=3):
  """A 40 x 30 matrix with singular values decay**i and random singular vectors."""
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((40, 40)))[0]
  v = np.linalg.qr(rng.standard_normal((30, 30)))[0]
  return ((u[:, :30] * (decay ** np.arange(30))) @ v.T).astype(np.float32)


# lora_factors runs weight-aware inits in NumPy for a weight on one CPU device ("host"), jitted
# otherwise ("compiled"); both must give the same init.
PATHS = {"host": lora_init.lora_factors, "compiled": lora_init._compiled_lora_factors}
on_each_path = pytest.mark.parametrize("factors_fn", PATHS.values(), ids=PATHS.keys())


@on_each_path
def test_pissa_niter_is_close_to_exact_on_a_decaying_spectrum(factors_fn):
  # Subspace iteration with an r-column sketch converges like (s_{r+1}/s_r)^(2 niter + 1) =
  # 0.3^9 ~ 2e-5 here, relative to s_1 = 1.
  w = _decaying(0.3)
  exact = lora_init.pissa_init(None, w, 4, 1.0)
  approx = factors_fn("pissa_niter_4", jax.random.key(0), jnp.asarray(w), 4, 1.0)
  np.testing.assert_allclose(approx.a @ approx.b, exact.a @ exact.b, atol=1e-5)
  np.testing.assert_allclose(approx.residual + approx.a @ approx.b, w, atol=1e-5)


def test_pissa_niter_is_as_accurate_as_torch_svd_lowrank():
  """PEFT's pissa_niter_k is torch.svd_lowrank(W, q=r, niter=k): same sketch width, so over
  seeds our error from the exact top-r product has the same size as torch's (one power
  iteration fewer would double it; 8 oversampled columns would cut it 100-fold)."""
  torch = pytest.importorskip("torch")
  w = _decaying(0.7)  # slow decay: the error (~1e-3) is far above float rounding
  exact = lora_init.pissa_init(None, w, 4, 1.0)
  target = np.asarray(exact.a @ exact.b)
  errors = {name: [] for name in (*PATHS, "torch")}
  for seed in range(64):
    for name, factors_fn in PATHS.items():
      f = factors_fn("pissa_niter_4", jax.random.key(seed), jnp.asarray(w), 4, 1.0)
      errors[name].append(np.abs(np.asarray(f.a @ f.b) - target).max())
    torch.manual_seed(seed)
    u, s, v = torch.svd_lowrank(torch.from_numpy(w.T.copy()), q=4, niter=4)
    errors["torch"].append(np.abs(((u * s) @ v.T).numpy().T - target).max())
  medians = {name: np.median(e) for name, e in errors.items()}
  for name in PATHS:
    assert medians["torch"] / 1.5 < medians[name] < 1.5 * medians["torch"], medians


@pytest.mark.parametrize("init", ["pissa", "milora", "olora"])
def test_weight_aware_inits_agree_on_host_and_compiled(init):
  w = jnp.asarray(_w((16, 12), 7))
  host = PATHS["host"](init, jax.random.key(0), w, 3, 2.0)
  compiled = PATHS["compiled"](init, jax.random.key(0), w, 3, 2.0)
  # Singular vectors are unique up to sign: compare what the signs cancel from.
  for view in (lambda f: f.a @ f.b, lambda f: f.a.T @ f.a, lambda f: f.b @ f.b.T, lambda f: f.residual):
    np.testing.assert_allclose(view(host), view(compiled), atol=1e-5)


def test_host_init_compiles_nothing_and_returns_device_arrays(monkeypatch):
  def fail(*args):
    raise AssertionError("the compiled init ran for a weight on one CPU device")
  monkeypatch.setattr(lora_init, "_compiled_lora_factors", fail)
  w = jax.device_put(jnp.asarray(_w((16, 12), 8)), jax.devices("cpu")[0])
  factors = lora_init.lora_factors("pissa_niter_2", jax.random.key(0), w, 3, 1.0)
  for x in factors:
    assert isinstance(x, jax.Array) and x.sharding == w.sharding


def test_traced_weight_takes_the_compiled_init():
  w = jnp.asarray(_w((16, 12), 9))
  traced = jax.jit(lambda w: lora_init.lora_factors("pissa", jax.random.key(0), w, 3, 1.0))(w)
  eager = lora_init.lora_factors("pissa", jax.random.key(0), w, 3, 1.0)
  for ours, theirs in zip(traced, eager):
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_milora_takes_the_bottom_singular_components():
  spec = lrj.adapters.lora(rank=2, alpha=4.0, init="milora")
  adapter, w = _attached(spec)
  update = spec.scale * np.asarray(adapter.lora_a[...]) @ np.asarray(adapter.lora_b[...])
  u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(update, (u[:, -2:] * s[-2:]) @ vt[-2:], atol=1e-4)
  np.testing.assert_allclose(np.asarray(adapter.base.kernel[...]) + update, w, atol=1e-5)


def test_olora_factor_is_orthonormal_and_residual_restores_weight():
  spec = lrj.adapters.lora(rank=5, alpha=10.0, init="olora")
  adapter, w = _attached(spec)
  b = np.asarray(adapter.lora_b[...])
  np.testing.assert_allclose(b @ b.T, np.eye(5), atol=1e-5)
  a = np.asarray(adapter.lora_a[...])
  np.testing.assert_allclose(np.asarray(adapter.base.kernel[...]) + spec.scale * a @ b, w, atol=1e-5)
  # b spans the leading rows of the (out, in) weight's QR: Q[:, :r]^T W^T... i.e. W = Q R.
  q, r = np.linalg.qr(w.T)
  np.testing.assert_allclose(np.abs(b), np.abs(q[:, :5].T), atol=1e-5)
  np.testing.assert_allclose(np.abs(a), np.abs(r[:5].T), atol=1e-4)


def test_forward_is_base_plus_scaled_low_rank_path():
  spec = lrj.adapters.lora(rank=3, alpha=6.0)
  adapter, w = _attached(spec)
  adapter.lora_b[...] = jnp.asarray(_w((3, 12), 7))
  x = _w((5, 16), 8)
  a, b = np.asarray(adapter.lora_a[...]), np.asarray(adapter.lora_b[...])
  expected = x @ w + np.asarray(adapter.base.bias[...]) + 2.0 * (x @ a) @ b
  np.testing.assert_allclose(adapter(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_adapter_input_only_in_training():
  spec = lrj.adapters.lora(rank=4, dropout=0.5)
  adapter, w = _attached(spec)
  adapter.lora_b[...] = jnp.asarray(_w((4, 12), 9))
  x = jnp.asarray(_w((64, 16), 10))
  expected_eval = x @ w + adapter.base.bias[...] + (x @ adapter.lora_a[...]) @ adapter.lora_b[...]
  adapter.eval()
  np.testing.assert_allclose(adapter(x), expected_eval, rtol=1e-5, atol=1e-5)
  adapter.train()
  y_train = adapter(x)
  # The base path is untouched by dropout: y - base(x) is the dropped low-rank path.
  low_rank = np.asarray(y_train - adapter.base(x))
  z = np.asarray(x @ adapter.lora_a[...])
  assert not np.allclose(low_rank, z @ np.asarray(adapter.lora_b[...]), atol=1e-3)


def test_lora_bias_is_added_and_merged():
  spec = lrj.adapters.lora(rank=2, use_bias=True)
  adapter, _ = _attached(spec)
  adapter.lora_bias[...] = jnp.arange(12, dtype=jnp.float32)
  x = jnp.asarray(_w((3, 16), 11))
  y = adapter(x)
  np.testing.assert_allclose(y - adapter.base(x), np.broadcast_to(np.arange(12.0), (3, 12)), atol=1e-5)
  merged = adapter.merge()
  np.testing.assert_allclose(merged(x), y, atol=1e-5)


def test_lora_bias_merges_into_a_bias_free_base():
  layer = nnx.Linear(6, 4, use_bias=False, rngs=nnx.Rngs(0))
  host = nnx.Dict(layer=layer)
  lrj.attach(host, [("layer", lrj.adapters.lora(rank=2, use_bias=True))], rngs=nnx.Rngs(1))
  host["layer"].lora_bias[...] = jnp.ones(4)
  x = jnp.ones((2, 6))
  y = host["layer"](x)
  lrj.merge(host)
  np.testing.assert_allclose(host["layer"](x), y, atol=1e-6)
  assert host["layer"].use_bias

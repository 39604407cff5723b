"""FourierFT and LoCA: PEFT parity, the transforms' math, location selection, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import calibrate
from lowrank_jax import linalg
from lowrank_jax.adapters import spectral

from lrj_testing import Host


def _linear(fan_in=12, fan_out=10, seed=0):
  return Host(nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(seed)))


def test_fourierft_matches_peft_delta_and_forward():
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  fan_in, fan_out, n = 12, 10, 30
  torch.manual_seed(0)
  net = torch.nn.Sequential()
  net.add_module("lin", torch.nn.Linear(fan_in, fan_out))
  config = peft.FourierFTConfig(n_frequency=n, scaling=150.0, random_loc_seed=7,
                                target_modules=["lin"], init_weights=False)
  peft_model = peft.get_peft_model(net, config)
  layer = peft_model.base_model.model.lin
  with torch.no_grad():
    layer.fourierft_spectrum["default"].copy_(torch.randn(n))
  peft_delta = layer.get_delta_weight("default").detach().numpy()  # (out, in)
  rows, cols = layer.indices["default"].numpy()                    # out index, in index

  model = _linear(fan_in, fan_out)
  model.layer.kernel[...] = jnp.asarray(net.lin.weight.detach().numpy().T)
  model.layer.bias[...] = jnp.asarray(net.lin.bias.detach().numpy())
  lrj.attach(model, [("layer", lrj.adapters.fourierft(n_frequency=n))], rngs=nnx.Rngs(0))
  adapter = model.layer
  adapter.locations = tuple(int(c * fan_out + r) for r, c in zip(rows, cols))
  adapter.coefficients[...] = jnp.asarray(layer.fourierft_spectrum["default"].detach().numpy())
  np.testing.assert_allclose(adapter.delta_matrix(), peft_delta.T, rtol=1e-5, atol=1e-6)
  x = np.random.default_rng(0).normal(size=(4, fan_in)).astype(np.float32)
  with torch.no_grad():
    expected = peft_model(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)


def test_fourierft_delta_is_the_real_inverse_dft_of_the_sparse_spectrum():
  key_c, key_l = jax.random.split(jax.random.key(1))
  shape, n = (6, 5), 9
  locations = spectral.random_locations(key_l, *shape, n)
  c = jax.random.normal(key_c, (n,))
  delta = spectral.spectral_delta(c, locations, shape, "fourier", 2.0)
  # Direct sum: dW[j, k] = s/(m n) sum_i c_i cos(2 pi (u_i j / m + v_i k / n)).
  j, k = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
  u, v = np.asarray(locations) // 5, np.asarray(locations) % 5
  direct = sum(ci * np.cos(2 * np.pi * (ui * j / 6 + vi * k / 5)) for ci, ui, vi in zip(c, u, v))
  np.testing.assert_allclose(delta, 2.0 * direct / 30, atol=1e-5)
  assert len(set(np.asarray(locations).tolist())) == n  # distinct locations


def test_fourier_real_part_spans_only_centro_symmetric_updates():
  # The reason for the contract's capacity exemption on the 8x9 conv matrix.
  m, n = 8, 9
  basis = [np.asarray(spectral.spectral_delta(jnp.ones(1), jnp.asarray([i]), (m, n), "fourier", 1.0))
           .ravel() for i in range(m * n)]
  assert np.linalg.matrix_rank(np.stack(basis), tol=1e-6) == 37
  delta = basis[5].reshape(m, n)
  flipped = delta[(-np.arange(m)) % m][:, (-np.arange(n)) % n]
  np.testing.assert_allclose(delta, flipped, atol=1e-6)


def test_loca_delta_is_the_inverse_dct_of_the_sparse_spectrum_and_orthonormal():
  shape, n = (7, 6), 8
  locations = spectral.random_locations(jax.random.key(2), *shape, n)
  c = jax.random.normal(jax.random.key(3), (n,))
  delta = spectral.spectral_delta(c, locations, shape, "dct", 1.5)
  z = np.zeros(shape).ravel()
  z[np.asarray(locations)] = c
  d_in, d_out = np.asarray(linalg.dct_matrix(7)), np.asarray(linalg.dct_matrix(6))
  np.testing.assert_allclose(delta, 1.5 * d_in.T @ z.reshape(shape) @ d_out, atol=1e-5)
  # Orthonormal basis: ||dW||_F = s ||c||.
  np.testing.assert_allclose(np.linalg.norm(delta), 1.5 * np.linalg.norm(c), rtol=1e-5)


def test_loca_gradient_init_picks_the_largest_frequency_gradients():
  model = _linear()
  grad = jax.random.normal(jax.random.key(4), (12, 10))
  calibration = {"layer": calibrate.SiteStats(grad=grad)}
  lrj.attach(model, [("layer", lrj.adapters.loca(n_frequency=5, init="gradient"))],
             rngs=nnx.Rngs(0), calibration=calibration)
  freq = np.abs(np.asarray(linalg.dct_matrix(12) @ grad @ linalg.dct_matrix(10).T)).ravel()
  assert set(model.layer.locations) == set(np.argsort(freq)[-5:].tolist())


def test_loca_finite_difference_step_moves_towards_lower_estimated_loss():
  # On a linear loss L = <G, dW>, dL/dZ = s D_in G D_out^T exactly; a location step
  # must not raise the true loss change a_k (F[new] - F[old]) of any coefficient.
  model = _linear()
  lrj.attach(model, [("layer", lrj.adapters.loca(n_frequency=10))], rngs=nnx.Rngs(1))
  adapter = model.layer
  adapter.coefficients[...] = jax.random.normal(jax.random.key(5), (10,))
  grad = jax.random.normal(jax.random.key(6), (12, 10))
  loss = lambda: float(jnp.sum(grad * adapter.delta_matrix()))
  before, old = loss(), adapter.locations
  adapter.update_locations(grad)
  assert loss() < before
  moved = [(o // 10 - n // 10, o % 10 - n % 10) for o, n in zip(old, adapter.locations)]
  assert all(abs(a) + abs(b) <= 1 for a, b in moved) and any(moved)


def test_spectral_bad_input():
  model = _linear(4, 3)
  with pytest.raises(ValueError, match=r"n_frequency=13 exceeds the number of entries.*= 12"):
    lrj.attach(model, [("layer", lrj.adapters.fourierft(n_frequency=13))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"loca at 'layer': n_frequency=20"):
    lrj.attach(_linear(4, 3), [("layer", lrj.adapters.loca(n_frequency=20))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="positive integer"):
    lrj.adapters.loca(n_frequency=0)
  with pytest.raises(ValueError, match="unknown init"):
    lrj.adapters.loca(init="top")
  with pytest.raises(ValueError, match="needs calibration"):
    lrj.attach(_linear(), [("layer", lrj.adapters.loca(n_frequency=4, init="gradient"))],
               rngs=nnx.Rngs(0))
  model = _linear()
  lrj.attach(model, [("layer", lrj.adapters.loca(n_frequency=4))], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"weight_grad must have shape \(12, 10\)"):
    model.layer.update_locations(jnp.zeros((10, 12)))

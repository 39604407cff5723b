"""The math of the product adapters: VeRA, LoHa, LoKr, Compacter, SoKA, and the
Kronecker helpers of linalg, on fresh random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import linalg


class Stack(nnx.Module):
  """Three linear layers of different shapes at paths layers/0..2."""

  def __init__(self, dims=(12, 10, 8, 12), seed=0):
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return x


def _randomize(model, seed, scale=0.3):
  state = nnx.state(model, lrj.AdapterParam)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree_util.tree_unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]))


def _count(state):
  return sum(v.size for v in jax.tree_util.tree_leaves(state))


# -- linalg Kronecker helpers --------------------------------------------------------
def test_kron_factorization_matches_peft_examples():
  # The examples of peft.tuners.lokr.layer.factorization's docstring.
  assert linalg.kron_factorization(256) == (16, 16)
  assert linalg.kron_factorization(128) == (8, 16)
  assert linalg.kron_factorization(127) == (1, 127)
  assert linalg.kron_factorization(128, 4) == (4, 32)


def test_kron_sum_matmul_and_kpsvd():
  ka, kb, kx, kw = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(ka, (3, 2, 5))
  b = jax.random.normal(kb, (3, 4, 3))
  dense = sum(jnp.kron(a[i], b[i]) for i in range(3))
  np.testing.assert_allclose(linalg.kron_sum(a, b), dense, rtol=1e-5, atol=1e-5)
  x = jax.random.normal(kx, (2, 7, 8))
  np.testing.assert_allclose(linalg.kron_sum_matmul(x, a, b), x @ dense, rtol=1e-4, atol=1e-4)
  # KPSVD is the best sum of k Kronecker products: its error is the tail of R(w)'s spectrum.
  w = jax.random.normal(kw, (8, 15))
  for k in (1, 3):
    fa, fb, s = linalg.kpsvd(w, (2, 5), k)
    err = jnp.linalg.norm(w - linalg.kron_sum(fa, fb))
    np.testing.assert_allclose(err, jnp.sqrt(jnp.sum(s[k:] ** 2)), rtol=1e-4)
  with pytest.raises(ValueError, match="does not divide"):
    linalg.kron_rearrange(w, (3, 5))


# -- VeRA ------------------------------------------------------------------------------
def test_vera_basis_is_stored_once_and_shared_across_layers():
  model = Stack()
  lrj.attach(model, [("layers/.*", lrj.adapters.vera(rank=4))], rngs=nnx.Rngs(1))
  adapters = [layer for layer in model.layers]
  assert all(a.vera_a is adapters[0].vera_a and a.vera_bmat is adapters[0].vera_bmat
             for a in adapters)
  buffers = jax.tree_util.tree_leaves(nnx.state(model, lrj.adapters.AdapterBuffer))
  assert sorted(b.shape for b in buffers) == [(4, 12), (12, 4)]  # largest fan_in, fan_out
  # Splitting and merging the model keeps one shared copy.
  graphdef, state = nnx.split(model)
  rebuilt = nnx.merge(graphdef, state)
  assert rebuilt.layers[1].vera_a is rebuilt.layers[2].vera_a
  # Trainable: d (r,) and b (fan_out,) per layer.
  assert _count(nnx.state(model, lrj.AdapterParam)) == sum(4 + a.view.fan_out for a in adapters)


def test_vera_delta_uses_each_layers_slice_of_the_basis():
  model = Stack()
  lrj.attach(model, [("layers/.*", lrj.adapters.vera(rank=5))], rngs=nnx.Rngs(1))
  _randomize(model, 2)
  a_full = np.asarray(model.layers[0].vera_a[...])
  b_full = np.asarray(model.layers[0].vera_bmat[...])
  x = jax.random.normal(jax.random.key(3), (4, 10))
  layer = model.layers[1]  # 10 -> 8
  d, b = np.asarray(layer.vera_d[...]), np.asarray(layer.vera_b[...])
  expected = a_full[:10] @ np.diag(d) @ b_full[:, :8] @ np.diag(b)
  np.testing.assert_allclose(layer.delta(), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer(x), layer.base(x) + x @ expected, rtol=1e-5, atol=1e-5)


def test_vera_equal_specs_share_a_basis_and_different_specs_do_not():
  model = Stack()
  spec = lrj.adapters.vera(rank=3)
  lrj.attach(model, [("layers/0", spec), ("layers/1", lrj.adapters.vera(rank=3)),
                     ("layers/2", lrj.adapters.vera(rank=3, projection_seed=1))],
             rngs=nnx.Rngs(1))
  assert model.layers[0].vera_a is model.layers[1].vera_a
  assert model.layers[2].vera_a is not model.layers[0].vera_a


def test_vera_basis_smaller_than_a_layer_is_an_error_naming_the_path():
  model = Stack()
  with pytest.raises(ValueError, match=r"vera at 'layers/0'.*\(10, 12\).*\(12, 10\)"):
    lrj.attach(model, [("layers/.*", lrj.adapters.vera(rank=4, basis_shape=(10, 12)))],
               rngs=nnx.Rngs(1))


# -- LoHa ------------------------------------------------------------------------------
def test_loha_update_is_a_hadamard_product_of_rank_at_most_r_squared():
  base = nnx.Linear(20, 30, rngs=nnx.Rngs(0))
  spec = lrj.adapters.loha(rank=3, alpha=6)
  adapter = spec.build(base, rngs=nnx.Rngs(1), path="layer")
  _randomize(adapter, 4, scale=1.0)
  a1, b1, a2, b2 = (np.asarray(getattr(adapter, n)[...]) for n in
                    ("loha_a1", "loha_b1", "loha_a2", "loha_b2"))
  expected = 2.0 * (a1 @ b1) * (a2 @ b2)
  np.testing.assert_allclose(adapter.delta(), expected, rtol=1e-5, atol=1e-5)
  assert np.linalg.matrix_rank(expected) == 9  # r^2 > r, generic factors
  x = jax.random.normal(jax.random.key(5), (6, 20))
  np.testing.assert_allclose(adapter(x), base(x) + x @ expected, rtol=1e-4, atol=1e-4)
  assert spec.num_params(20, 30) == 2 * 3 * (20 + 30) == _count(nnx.state(adapter, lrj.AdapterParam))


# -- LoKr ------------------------------------------------------------------------------
@pytest.mark.parametrize("hp,stored", [
    (dict(rank=8), {"lokr_c": (3, 5), "lokr_m": (4, 6)}),
    (dict(rank=1), {"lokr_c": (3, 5), "lokr_m_a": (4, 1), "lokr_m_b": (1, 6)}),
    (dict(rank=1, decompose_both=True),
     {"lokr_c_a": (3, 1), "lokr_c_b": (1, 5), "lokr_m_a": (4, 1), "lokr_m_b": (1, 6)}),
    (dict(rank=5, kron_shape=(2, 3)), {"lokr_c": (2, 3), "lokr_m": (6, 10)}),
])
def test_lokr_update_is_a_kronecker_product(hp, stored):
  base = nnx.Linear(12, 30, rngs=nnx.Rngs(0))  # 12 = 3 * 4, 30 = 5 * 6
  spec = lrj.adapters.lokr(alpha=3.0, **hp)
  adapter = spec.build(base, rngs=nnx.Rngs(1), path="layer")
  assert {k: tuple(getattr(adapter, k).shape) for k in stored} == stored
  assert spec.num_params(12, 30) == _count(nnx.state(adapter, lrj.AdapterParam))
  _randomize(adapter, 6, scale=1.0)
  get = lambda n: (np.asarray(getattr(adapter, n)[...]) if hasattr(adapter, n) else
                   np.asarray(getattr(adapter, n + "_a")[...]) @ np.asarray(getattr(adapter, n + "_b")[...]))
  c, m = get("lokr_c"), get("lokr_m")
  expected = 3.0 / hp["rank"] * np.kron(c, m)
  np.testing.assert_allclose(adapter.delta(), expected, rtol=1e-5, atol=1e-5)
  assert np.linalg.matrix_rank(expected) == np.linalg.matrix_rank(c) * np.linalg.matrix_rank(m)
  x = jax.random.normal(jax.random.key(7), (5, 12))
  np.testing.assert_allclose(adapter(x), base(x) + x @ expected, rtol=1e-4, atol=1e-4)


def test_lokr_kronecker_shape_not_dividing_the_layer_is_an_error_naming_the_path():
  model = Stack()
  with pytest.raises(ValueError, match=r"lokr at 'layers/1'.*\(4, 3\).*\(10, 8\)"):
    lrj.attach(model, [("layers/1", lrj.adapters.lokr(kron_shape=(4, 3)))], rngs=nnx.Rngs(1))


# -- Compacter -------------------------------------------------------------------------
def test_compacter_shares_its_slow_weights_across_layers():
  model = Stack(dims=(12, 8, 4, 12))
  lrj.attach(model, [("layers/.*", lrj.adapters.compacter(n=2))], rngs=nnx.Rngs(1))
  layers = list(model.layers)
  assert all(l.compacter_a is layers[0].compacter_a for l in layers)
  assert layers[0].compacter_a.shape == (2, 2, 2)
  # One copy of A in the trainable state: n^3 + per layer (fan_in + fan_out).
  expected = 8 + sum(l.view.fan_in + l.view.fan_out for l in layers)
  assert _count(nnx.state(model, lrj.AdapterParam)) == expected
  _randomize(model, 8)
  layer = layers[1]
  a, s, t = (np.asarray(v[...]) for v in (layer.compacter_a, layer.compacter_s, layer.compacter_t))
  expected_delta = sum(np.kron(a[i], np.outer(s[i], t[i])) for i in range(2))
  np.testing.assert_allclose(layer.delta(), expected_delta, rtol=1e-5, atol=1e-5)
  # The gradient of the shared factor sums the contributions of all layers.
  x = jax.random.normal(jax.random.key(9), (3, 12))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
  assert float(jnp.abs(grads["layers"][0]["compacter_a"][...]).max()) > 0


def test_compacter_defaults_and_bad_n():
  spec = lrj.adapters.compacter()
  assert spec.num_params(12, 10) == 4 * 4 * 2 + 4 * (3 + 5)  # p = 4 | 12, q = 2 | 10, n = 4
  model = Stack()
  with pytest.raises(ValueError, match=r"compacter at 'layers/0'.*\(3, 3\).*\(12, 10\)"):
    lrj.attach(model, [("layers/.*", lrj.adapters.compacter(n=3))], rngs=nnx.Rngs(1))


# -- SoKA ------------------------------------------------------------------------------
def _kronecker_weight_layer(noise):
  """A 12 -> 10 layer whose kernel is two Kronecker terms plus noise."""
  ka, kb, kn = jax.random.split(jax.random.key(10), 3)
  a = jax.random.normal(ka, (2, 3, 2)) * jnp.array([4.0, 2.0])[:, None, None]
  b = jax.random.normal(kb, (2, 4, 5))
  w = linalg.kron_sum(a, b) + noise * jax.random.normal(kn, (12, 10))
  layer = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
  layer.kernel[...] = w
  return layer, w


def test_soka_takes_the_principal_kronecker_components_and_keeps_the_function():
  layer, w = _kronecker_weight_layer(noise=1e-3)
  x = jax.random.normal(jax.random.key(11), (4, 12))
  y0 = layer(x)
  adapter = lrj.adapters.soka(terms=2).build(layer, rngs=nnx.Rngs(0), path="layer")
  np.testing.assert_allclose(adapter(x), y0, rtol=1e-5, atol=1e-5)
  # The residual holds only the noise: the two components are in the adapter.
  assert float(jnp.abs(adapter.base.kernel[...]).max()) < 1e-2
  np.testing.assert_allclose(adapter.delta() + adapter.base.kernel[...], w, rtol=1e-5, atol=1e-5)


def _kpsvd_terms_reference(w, p, q, k):
  """The KPSVD of SoKA's Algorithm 1 (as summarized by the Moonlight review), in numpy.

  Each (m, n) block of w becomes one row of W', W' = U S V^T, and term j is
  ``s_j reshape(u_j, (p, q)) ⊗ reshape(v_j, (m, n))``.
  """
  m, n = w.shape[0] // p, w.shape[1] // q
  rows = [w[i * m:(i + 1) * m, j * n:(j + 1) * n].reshape(-1) for i in range(p) for j in range(q)]
  u, s, vt = np.linalg.svd(np.stack(rows), full_matrices=False)
  return sum(s[j] * np.kron(u[:, j].reshape(p, q), vt[j].reshape(m, n)) for j in range(k))


@pytest.mark.parametrize("terms", [1, 3])
def test_soka_init_is_the_top_kronecker_terms_of_w0(terms):
  layer = nnx.Linear(12, 10, rngs=nnx.Rngs(3))
  w0 = np.asarray(layer.kernel[...], np.float64)
  adapter = lrj.adapters.soka(terms=terms, kron_shape=(3, 2)).build(layer, rngs=nnx.Rngs(0),
                                                                     path="l")
  expected = _kpsvd_terms_reference(w0, 3, 2, terms)
  np.testing.assert_allclose(adapter.delta(), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(adapter.base.kernel[...], w0 - expected, rtol=1e-4, atol=1e-5)


def test_soka_energy_picks_the_number_of_terms():
  layer, _ = _kronecker_weight_layer(noise=1e-3)
  adapter = lrj.adapters.soka(terms=5, energy=0.999).build(layer, rngs=nnx.Rngs(0), path="l")
  assert adapter.num_terms == 2
  assert _count(nnx.state(adapter, lrj.AdapterParam)) == 2 * (3 * 2 + 4 * 5)
  layer, _ = _kronecker_weight_layer(noise=1e-3)
  adapter = lrj.adapters.soka(terms=5, energy=0.5).build(layer, rngs=nnx.Rngs(0), path="l")
  assert adapter.num_terms == 1


def test_soka_bad_input():
  layer = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"soka at 'blk/l'.*\(5, 2\)"):
    lrj.adapters.soka(kron_shape=(5, 2)).build(layer, rngs=nnx.Rngs(0), path="blk/l")
  with pytest.raises(ValueError, match="terms=7 exceeds the 6 Kronecker components"):
    lrj.adapters.soka(terms=7).build(layer, rngs=nnx.Rngs(0), path="blk/l")
  with pytest.raises(ValueError, match="energy"):
    lrj.adapters.soka(energy=1.5)

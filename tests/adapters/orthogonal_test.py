"""The math of OFT, BOFT and HRA on fresh random inputs: orthogonal factors,
identity at init, the structure of R, HRA's regularizer, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import linalg
from lowrank_jax.adapters import orthogonal


def _build(name, fan_in=16, fan_out=6, path="blk/proj", **hp):
  base = nnx.Linear(fan_in, fan_out, rngs=nnx.Rngs(0))
  return lrj.adapters.get(name, **hp).build(base, rngs=nnx.Rngs(1), path=path)


def _randomize(adapter, seed, scale=0.5):
  state = nnx.state(adapter, lrj.AdapterParam)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(adapter, jax.tree_util.tree_unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]))


def _assert_orthogonal(r, atol=1e-5):
  eye = np.eye(r.shape[0])
  np.testing.assert_allclose(r.T @ r, eye, atol=atol)
  np.testing.assert_allclose(r @ r.T, eye, atol=atol)


@pytest.mark.parametrize("name,hp", [
    ("oft", dict(block_size=4)), ("oft", dict(num_blocks=2, block_share=True)),
    ("boft", dict(block_size=2, butterfly_factors=3)), ("hra", dict(rank=6)),
])
def test_identity_at_init_and_orthogonal_after_training_steps(name, hp):
  adapter = _build(name, **hp)
  np.testing.assert_allclose(adapter.rotation(), np.eye(16), atol=1e-6)
  _randomize(adapter, 2)
  r = np.asarray(adapter.rotation())
  _assert_orthogonal(r)
  assert np.abs(r - np.eye(16)).max() > 0.1
  w0 = np.asarray(adapter.base.kernel[...])
  scale = np.asarray(adapter.boft_scale[...]) if name == "boft" else np.ones(6)
  np.testing.assert_allclose(adapter.effective_kernel(), (r @ w0) * scale[None, :], atol=1e-5)


def test_oft_rotation_is_block_diagonal_cayley():
  adapter = _build("oft", block_size=4)
  _randomize(adapter, 3)
  r = np.asarray(adapter.rotation())
  q = np.asarray(linalg.skew_from_vector(adapter.oft_q[...], 4))
  for k in range(4):
    block = slice(4 * k, 4 * k + 4)
    eye = np.eye(4)
    np.testing.assert_allclose(r[block, block], np.linalg.solve(eye - q[k], eye + q[k]), atol=1e-5)
    off = r[block].copy()
    off[:, block] = 0.0
    assert np.abs(off).max() == 0.0
  assert np.isclose(np.linalg.det(r), 1.0, atol=1e-5)


def test_oft_neumann_series_approaches_orthogonality_with_the_order():
  errors = []
  for order in (1, 3, 6):
    adapter = _build("oft", block_size=8, cayley_neumann_order=order)
    _randomize(adapter, 4, scale=0.05)
    r = np.asarray(adapter.rotation())
    errors.append(np.abs(r.T @ r - np.eye(16)).max())
  assert errors[0] > errors[1] > errors[2]


def test_boft_is_the_product_of_permuted_block_diagonal_factors():
  adapter = _build("boft", block_size=2, butterfly_factors=3)
  _randomize(adapter, 5)
  blocks = np.asarray(orthogonal.cayley_blocks(adapter.boft_q[...], 2, 0))
  expected = np.eye(16)
  for i, factor in enumerate(blocks):
    perm = np.asarray(adapter.permutations[i])
    p = np.eye(16)[perm]  # (P v)[j] = v[perm[j]]
    dense = np.zeros((16, 16))
    for k in range(8):
      dense[2 * k:2 * k + 2, 2 * k:2 * k + 2] = factor[k]
    expected = p @ dense @ p.T @ expected
  np.testing.assert_allclose(adapter.rotation(), expected, atol=1e-5)
  # Each factor pairs index j with j + 2^i: after 3 factors every index reaches 8 others.
  reach = (np.abs(expected) > 1e-9).sum(axis=1)
  assert reach.min() == 8


def test_butterfly_permutations():
  # P_1 for 8 indices, 2 groups of 4, chunks of 1: even chunks first within each group.
  np.testing.assert_array_equal(orthogonal.butterfly_permutation(8, 2, 1), [0, 2, 1, 3, 4, 6, 5, 7])
  perm = orthogonal.butterfly_permutation(16, 1, 2)
  np.testing.assert_array_equal(perm, [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15])


def test_hra_is_a_chain_of_householder_reflections():
  adapter = _build("hra", rank=4)
  _randomize(adapter, 6)
  u = np.asarray(adapter.hra_u[...], np.float64)
  h = np.eye(16)
  for i in range(4):
    v = u[:, i:i + 1]
    h = h @ (np.eye(16) - 2.0 * v @ v.T / (v.T @ v))
  np.testing.assert_allclose(adapter.rotation(), h.T, atol=1e-5)  # W = H^T W0 in (in, out)
  # Rank of the update is at most r: W0 H - W0 spans at most r directions.
  assert np.linalg.matrix_rank(np.asarray(adapter.delta()), tol=1e-5) <= 4


def test_hra_penalty_is_the_papers_regularizer_summed_over_layers():
  model = nnx.Dict(a=nnx.Linear(8, 4, rngs=nnx.Rngs(0)), b=nnx.Linear(4, 4, rngs=nnx.Rngs(1)))

  class Host(nnx.Module):
    def __init__(self):
      self.layers = model

  host = Host()
  lrj.attach(host, [("layers/.*", lrj.adapters.hra(rank=2))], rngs=nnx.Rngs(2))
  # Identical pairs at init: the normalized vectors coincide, so the Gram matrix is all ones.
  np.testing.assert_allclose(lrj.adapters.hra_penalty(host), 2 * 2.0, rtol=1e-6)
  host.layers["a"].hra_u[...] = jnp.eye(8)[:, :2] * jnp.array([3.0, 0.5])
  host.layers["b"].hra_u[...] = jnp.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
  # a: orthogonal vectors -> 0; b: cos = 1/sqrt(2) -> 2 * (1/2) = 1.
  np.testing.assert_allclose(lrj.adapters.hra_penalty(host), 1.0, rtol=1e-6)
  grads = nnx.grad(lrj.adapters.hra_penalty, argnums=nnx.DiffState(0, lrj.AdapterParam))(host)
  assert float(jnp.abs(grads["layers"]["b"]["hra_u"][...]).max()) > 0
  assert float(lrj.adapters.hra_penalty(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))) == 0.0


def test_bad_input_names_the_layer_path():
  with pytest.raises(ValueError, match=r"oft at 'blk/proj': block_size=5 does not divide fan_in=16"):
    _build("oft", block_size=5)
  with pytest.raises(ValueError, match=r"oft at 'blk/proj': num_blocks=3 does not divide"):
    _build("oft", num_blocks=3)
  with pytest.raises(ValueError, match="not both"):
    lrj.adapters.oft(block_size=4, num_blocks=4)
  with pytest.raises(ValueError, match=r"boft at 'blk/proj'.*even block_size"):
    _build("boft", fan_in=12, block_size=3, butterfly_factors=2)
  with pytest.raises(ValueError, match=r"boft at 'blk/proj'.*multiple of 2\^2"):
    _build("boft", fan_in=12, block_size=2, butterfly_factors=3)  # 6 blocks, needs 4 | 6
  with pytest.raises(ValueError, match="rank must be even"):
    lrj.adapters.hra(rank=3)
  with pytest.raises(ValueError, match="cayley_neumann_order"):
    lrj.adapters.oft(cayley_neumann_order=-1)


def test_defaults_divide_the_layer():
  assert _build("oft", fan_in=12).block_size == 12
  assert _build("oft", fan_in=96).block_size == 32
  boft = _build("boft", fan_in=12)
  assert (boft.block_size, boft.num_blocks) == (6, 2)


def test_multiplicative_adapters_refuse_keep_adapters_merge():
  class Host(nnx.Module):
    def __init__(self):
      self.layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))

  host = Host()
  lrj.attach(host, [("layer", lrj.adapters.oft())], rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="not additive"):
    lrj.merge(host, keep_adapters=True)

"""Structured attention init: the heads' attention maps at init are the random shift matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import structured_init as si
from lowrank_jax.models import vit


def test_shift_matrix_is_a_permutation_to_the_offset_neighbour():
  a = si.shift_matrix(3, 4, 1, -1)
  assert np.array_equal(a.sum(1), np.ones(12)) and np.array_equal(a.sum(0), np.ones(12))
  assert a[0 * 4 + 2, 1 * 4 + 1] == 1.0  # (0, 2) -> (1, 1)
  assert a[2 * 4 + 0, 0 * 4 + 3] == 1.0  # wraps: (2, 0) -> (0, 3)


def test_vit_attention_maps_at_init_are_shift_matrices():
  model = vit.ViT(vit.ViTConfig(pool="mean", depth=2, dim=32, heads=4, mlp_dim=32), rngs=nnx.Rngs(0))
  errors = si.init_vit(model, key=jax.random.key(1))
  assert max(errors) < 1e-4
  # The first block's attention on an all-zero image (its input is then norm1(pos_embed)).
  block = model.blocks[0]
  attn = block.attn
  x = block.norm1(model.pos_embed[...][0])
  heads = lambda t: t.reshape(16, 4, 8).transpose(1, 0, 2)
  q, k = heads(attn.query(x)), heads(attn.key(x))
  maps = jax.nn.softmax(q @ k.transpose(0, 2, 1) / jnp.sqrt(8.0), -1)
  offsets = si.random_offsets(jax.random.split(jax.random.key(1), 2)[0], 4)
  for h, (dy, dx) in enumerate(offsets):
    np.testing.assert_allclose(maps[h], si.shift_matrix(4, 4, int(dy), int(dx)), atol=0.05)
  assert len({tuple(o) for o in offsets}) > 1  # heads get different filters


def test_bad_input():
  with pytest.raises(ValueError, match="pool='mean'"):
    si.init_vit(vit.ViT(vit.ViTConfig(pool="cls", depth=1), rngs=nnx.Rngs(0)), key=jax.random.key(0))
  model = vit.ViT(vit.ViTConfig(pool="mean", depth=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expected"):
    si.init_attention(model.blocks[0].attn, jnp.ones((15, 64)), (4, 4), key=jax.random.key(0))
  with pytest.raises(ValueError, match="has no 'query'"):
    si.init_attention(model.blocks[0].mlp, jnp.ones((16, 64)), (4, 4), key=jax.random.key(0))
  with pytest.raises(ValueError, match="odd"):
    si.random_offsets(jax.random.key(0), 4, window=2)

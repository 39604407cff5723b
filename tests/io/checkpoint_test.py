"""Orbax adapter-only and full-state checkpoints, also across processes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import io as lrj_io

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAKE = """
import jax, jax.numpy as jnp
from flax import nnx
import lowrank_jax as lrj
def make(method="dora", rank=2):
  m = nnx.Dict({"a": nnx.Linear(6, 5, rngs=nnx.Rngs(0)), "b": nnx.Linear(5, 4, rngs=nnx.Rngs(1))})
  lrj.attach(m, [("a", lrj.adapters.get(method, rank=rank)), ("b", lrj.adapters.lora(rank=3))],
             rngs=nnx.Rngs(2))
  return m
"""
namespace = {}
exec(MAKE, namespace)
make = namespace["make"]


def _forward(m):
  return np.asarray(m["b"](m["a"](jnp.linspace(-1, 1, 12).reshape(2, 6))))


def _train_a_little(m):
  nnx.update(m, jax.tree_util.tree_map(lambda v: v + 0.5, nnx.state(m, lrj.AdapterParam)))


def test_adapter_checkpoint_restores_in_another_process(tmp_path):
  m = make()
  _train_a_little(m)
  lrj_io.save_adapters(m, str(tmp_path / "ckpt"))
  script = MAKE + f"""
from lowrank_jax import io
import numpy as np
m = make()
io.restore_adapters(m, {str(tmp_path / 'ckpt')!r})
np.save({str(tmp_path / 'out.npy')!r}, np.asarray(m["b"](m["a"](jnp.linspace(-1, 1, 12).reshape(2, 6)))))
"""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _forward(m), rtol=1e-6)


def test_adapter_checkpoint_for_other_adapters_fails_and_leaves_model(tmp_path):
  m = make()
  _train_a_little(m)
  lrj_io.save_adapters(m, str(tmp_path))
  other = make(method="lora", rank=2)
  before = _forward(other)
  with pytest.raises(ValueError, match=r"Adapter site 'a' differs"):
    lrj_io.restore_adapters(other, str(tmp_path))
  np.testing.assert_array_equal(_forward(other), before)
  with pytest.raises(FileNotFoundError, match="not a lowrank_jax checkpoint"):
    lrj_io.restore_adapters(other, str(tmp_path / "nowhere"))


def test_full_state_checkpoint_round_trip(tmp_path):
  m = make()
  _train_a_little(m)
  lrj_io.save_state(m, str(tmp_path))
  fresh = make()
  assert not np.allclose(_forward(fresh), _forward(m))
  lrj_io.restore_state(fresh, str(tmp_path))
  np.testing.assert_allclose(_forward(fresh), _forward(m), rtol=1e-6)

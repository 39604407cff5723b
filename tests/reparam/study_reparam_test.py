"""The reparameterized pretraining configs run in the training loop, events included, and a run
with events resumes from its checkpoint exactly."""

import jax
import numpy as np
import pytest

from configs import pretrain_reparam
from configs import study_reparam
from experiments import loop
from experiments import study as study_lib


@pytest.mark.slow
def test_study_runlocal_runs_two_steps_per_method(tmp_path):
  study = study_reparam.get_config("runlocal=true")
  rows = study_lib.run_study(study, str(tmp_path))
  labels = [r["label"] for r in rows]
  assert labels == list(pretrain_reparam.methods(16, 16, 100)) + ["galore"]
  assert {"full", "poet", "poet_block", "sltrain", "lost", "relora", "switchlora"} <= set(labels)
  for row in rows:
    assert np.isfinite(row["val_loss"]) and row["trainable_params"] > 0
  full = next(r for r in rows if r["label"] == "full")
  block = next(r for r in rows if r["label"] == "poet_block")
  assert block["trainable_params"] < full["trainable_params"]
  galore = next(r for r in rows if r["label"] == "galore")
  assert galore["trainable_params"] == full["trainable_params"]
  assert galore["optimizer_state_bytes"] < full["optimizer_state_bytes"]


def test_study_only_selects_runs():
  assert [r["label"] for r in study_reparam.get_config("only=relora+galore").runs] == [
      "relora", "galore"]
  with pytest.raises(ValueError, match="only: unknown labels \\['nope'\\]"):
    study_reparam.get_config("only=nope")


def test_study_sizes_and_galore_run():
  study = study_reparam.get_config("steps=300,seeds=3,rank=8")
  assert study.seeds == (0, 1, 2)
  for run in study.runs:
    config = study_lib.run_config(run, 0)
    assert (config.steps, config.eval_every, config.log_every) == (300, 60, 6)
  galore = study.runs[-1]
  assert galore["label"] == "galore" and galore["overrides"]["optimizer.name"] == "galore"
  assert galore["overrides"]["optimizer.kwargs"] == {"rank": 8}
  config = study_lib.run_config(galore, 0)
  assert config.method == "full" and config.optimizer.kwargs.rank == 8
  with pytest.raises(ValueError, match="seeds must be >= 1"):
    study_reparam.get_config("seeds=0")


def _config(method, steps, event_every):
  config = pretrain_reparam.get_config(f"method={method},runlocal=true,event_every={event_every}")
  with config.unlocked():
    config.steps, config.checkpoint_every, config.eval_every = steps, 1, 100
    config.progress = False
    config.optimizer.schedule = "constant"  # the schedule would depend on config.steps
  return config


@pytest.mark.parametrize("method", ["poet_block"])
def test_run_with_events_resumes_exactly(method, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  loop.train_and_evaluate(_config(method, 5, event_every=2), str(straight))
  loop.train_and_evaluate(_config(method, 3, event_every=2), str(resumed))
  loop.train_and_evaluate(_config(method, 5, event_every=2), str(resumed))
  a = loop.restore_latest(_config(method, 5, 2), str(straight))
  b = loop.restore_latest(_config(method, 5, 2), str(resumed))
  assert set(a) == {"trainable", "opt_state", "rng", "frozen"}
  for part in ("trainable", "frozen", "opt_state"):
    for x, y in zip(jax.tree_util.tree_leaves(a[part]), jax.tree_util.tree_leaves(b[part])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_method_config_builds_locked_with_its_events():
  for label in pretrain_reparam.methods(16, 16, 100):
    config = pretrain_reparam.get_config(f"method={label}")
    assert config.is_locked
    events = loop.build_events(config)
    assert all(e.due(e.every) for e in events)
  with pytest.raises(ValueError, match="method must be one of"):
    pretrain_reparam.get_config("method=galore")

"""The optimizer pretraining study builds and every method runs 2 steps (runlocal)."""

import importlib

import ml_collections
import pytest

from experiments import optimizers
import lowrank_jax.optim as lo
from experiments import study as study_lib

PROJECTED = {"galore", "frugal"}


def _available(name):
  if name in PROJECTED:  # lowrank_jax's own; optax.contrib.galore would stand in otherwise
    return name in lo.names()
  try:
    optimizers.lookup(name)
    return True
  except ValueError:
    return False


def test_study_optimizers_runs_build_their_configs_and_optimizers():
  config = importlib.import_module("configs.study_optimizers").get_config("runlocal=true")
  assert [r["label"] for r in config.runs] == [
      "adamw_lr0.001", "galore_lr0.001", "dct_galore_lr0.001", "frugal_lr0.001", "muon_lr0.01",
      "dion_lr0.01"]
  for run in config.runs:
    run_config = study_lib.run_config(run, seed=0)
    assert run_config.is_locked
    optimizers.build(run_config)


@pytest.mark.slow
def test_study_optimizers_runlocal_runs_every_available_method(tmp_path):
  config = importlib.import_module("configs.study_optimizers").get_config("runlocal=true")
  labels = [r["label"] for r in config.runs]
  assert labels == ["adamw_lr0.001", "galore_lr0.001", "dct_galore_lr0.001", "frugal_lr0.001",
                    "muon_lr0.01", "dion_lr0.01"]
  names = {r["label"]: r["arg"].split("optimizer=")[1].split(",")[0] for r in config.runs}
  runnable = [r for r in config.runs if _available(names[r["label"]])]
  # Only the projected family may be absent from a checkout without lowrank_jax.optim.projection.
  assert {names[r["label"]] for r in config.runs if r not in runnable} <= PROJECTED
  study = ml_collections.ConfigDict(dict(name=config.name, seeds=config.seeds, runs=tuple(runnable)))
  rows = study_lib.run_study(study, str(tmp_path))
  assert [r["label"] for r in rows] == [r["label"] for r in runnable]
  for row in rows:
    assert row["val_loss"] is not None and row["val_loss"] == row["val_loss"]  # finite, not NaN
    assert row["optimizer_state_bytes"] > 0
  full = {r["label"]: r for r in rows}
  # Muon keeps one moment per matrix, AdamW two.
  assert full["muon_lr0.01"]["optimizer_state_bytes"] < full["adamw_lr0.001"]["optimizer_state_bytes"]

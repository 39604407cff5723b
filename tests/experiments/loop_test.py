"""The training loop: configs, resume after SIGKILL, NaN stop, sharding, locked configs."""

from __future__ import annotations

import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import lowrank_jax as lrj
from experiments import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

# Every config file with the args its docstring documents.
CONFIG_ARGS = {
    "teacher_student": ["", "method=full", "method=dora,rank=2", "method=lora,update_rank=8",
                        "init=pissa", "kind=orthogonal", "runlocal=true"],
    "pretrain_lm": ["", "method=lora,rank=4", "optimizer=adam", "domain=python", "size=small",
                    "runlocal=true"],
    "finetune_lm": ["", "method=full", "method=dora,init=pissa", "targets=qv", "runlocal=true"],
    "vit_digits": ["", "pool=mean", "train_examples=200", "method=lora", "runlocal=true"],
    "finetune_minilm": ["", "method=full", "method=dora,rank=4", "init=pissa", "runlocal=true"],
}


def _config(name, arg=""):
  return importlib.import_module(f"configs.{name}").get_config(arg or None)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIG_ARGS.items() for a in args])
def test_every_config_builds_and_is_locked(name, arg):
  config = _config(name, arg)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.stepz = 3


def test_bad_config_arg_lists_accepted_keys():
  with pytest.raises(ValueError, match=r"Unknown config arg 'rnk'.*'rank'"):
    _config("teacher_student", "rnk=3")


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_runlocal_runs_a_few_steps(name, tmp_path):
  config = _config(name, "runlocal=true")
  with config.unlocked():
    config.steps = 3
    config.progress = False
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary["val_loss"]) and summary["trainable_params"] > 0
  if name == "finetune_minilm":  # adapters plus the new classifier head
    assert summary["trainable_params"] == 16 * 2 * 384 * 24 + 384 * 10 + 10
  assert os.path.exists(tmp_path / "loss.png")
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  config = _config("teacher_student", "method=full")
  with config.unlocked():
    config.steps, config.log_every, config.checkpoint_every, config.eval_every = 40, 1, 1, 100
    config.progress = False
    config.optimizer.learning_rate = 30.0  # diverges after a few steps
    config.optimizer.name = "sgd"
  with pytest.raises(loop.TrainingDiverged, match=r"became non-finite at step (\d+)") as error:
    loop.train_and_evaluate(config, str(tmp_path))
  bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
  state = loop.restore_latest(config, str(tmp_path))
  leaves = jax.tree_util.tree_leaves(state["trainable"])
  assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "*"))
                 if os.path.basename(p).isdigit())
  assert saved and max(saved) < bad_step


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "experiments.train",
          "--config=configs/teacher_student.py:method=lora", f"--workdir={workdir}",
          "--config.progress=false", *overrides]


def test_mistyped_config_field_fails_clearly(tmp_path):
  result = subprocess.run(_train_cmd(tmp_path, "--config.stepz=3"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "stepz" in result.stderr


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  overrides = ["--config.steps=2500", "--config.checkpoint_every=100", "--config.eval_every=500",
               "--config.log_every=100"]
  killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
  process = subprocess.Popen(_train_cmd(killed_dir, *overrides), cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(os.path.basename(p)) for p in glob.glob(str(killed_dir / "checkpoints" / "*"))
             if os.path.basename(p).isdigit()]
    if steps and max(steps) >= 200:
      break
    assert process.poll() is None, "the run finished before it could be killed"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(int(os.path.basename(p)) for p in glob.glob(str(killed_dir / "checkpoints" / "*"))
                  if os.path.basename(p).isdigit())
  assert killed_at < 2500
  for workdir in (killed_dir, clean_dir):
    result = subprocess.run(_train_cmd(workdir, *overrides), cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
  config = _config("teacher_student", "method=lora")
  resumed = loop.restore_latest(config, str(killed_dir))["trainable"]
  uninterrupted = loop.restore_latest(config, str(clean_dir))["trainable"]
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(uninterrupted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  records = [json.loads(l) for l in open(killed_dir / "metrics.jsonl")]
  logged = [r["step"] for r in records if "loss" in r]
  assert logged == sorted(set(logged)) and logged[-1] == 2500


SHARDED_SCRIPT = r"""
import json, sys
import jax
from configs import teacher_student
from experiments import loop
config = teacher_student.get_config("method=dora")
with config.unlocked():
  config.steps, config.progress, config.eval_every, config.log_every = 5, False, 5, 1
summary = loop.train_and_evaluate(config, sys.argv[1])
print(json.dumps(dict(devices=jax.device_count(), loss=summary["train_loss"], val=summary["val_loss"])))
"""


def test_sharded_loss_equals_single_device_loss(tmp_path):
  results = {}
  for devices in (1, 8):
    env = dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / str(devices))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results[devices] = json.loads(out.stdout.strip().splitlines()[-1])
  assert results[8]["devices"] == 8 and results[1]["devices"] == 1
  np.testing.assert_allclose(results[8]["loss"], results[1]["loss"], rtol=1e-5)
  np.testing.assert_allclose(results[8]["val"], results[1]["val"], rtol=1e-5)


def test_study_writes_table_csv_and_plot(tmp_path):
  from experiments import study as study_lib
  study = importlib.import_module("configs.study_quick").get_config("runlocal=true")
  rows = study_lib.run_study(study, str(tmp_path))
  assert {r["label"] for r in rows} == {"full", "lora", "dora", "pissa"} and len(rows) == 8
  assert (tmp_path / "pretrain" / "checkpoints").exists()
  table = (tmp_path / "results.md").read_text()
  assert "| pissa | 2 |" in table
  assert (tmp_path / "comparison.png").stat().st_size > 1000
  assert len((tmp_path / "results.csv").read_text().splitlines()) == 9


def test_study_run_replaces_method_and_adapter_hyperparameters():
  from experiments import study as study_lib
  run = dict(label="dora_r2", config="teacher_student", arg="method=lora,rank=4",
             method="dora", adapter=dict(rank=2, detach_norm=False))
  config = study_lib.run_config(run, seed=3)
  assert config.method == "dora" and config.seed == 3 and config.is_locked
  assert config.adapter.to_dict() == {"rank": 2, "detach_norm": False}
  assert loop.adapter_rules(config)[0][1] == lrj.adapters.dora(rank=2, detach_norm=False)
  with pytest.raises(ValueError, match="need a 'method'"):
    study_lib.run_config(dict(label="x", config="teacher_student", adapter=dict(rank=2)), seed=0)

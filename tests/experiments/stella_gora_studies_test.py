"""The StelLA, GoRA and structured-init reproduction studies run end to end (2 steps, 1 seed)."""

import importlib
import os

import pytest

from configs import layer_ranks
from experiments import loop
from experiments import study
from experiments import tasks
from lowrank_jax.attach import adapters as adapter_sites

# The LM and ViT studies (pretraining / image tasks) are slow; they run with -m slow.
STUDIES = [("study_stella", "runlocal=true"), ("study_gora", "task=layer_ranks,runlocal=true"),
           pytest.param("study_gora", "task=lm,runlocal=true", marks=pytest.mark.slow),
           pytest.param("study_vit_init", "runlocal=true", marks=pytest.mark.slow)]
IDS = ["study_stella", "study_gora-task=layer_ranks", "study_gora-task=lm", "study_vit_init"]


@pytest.mark.parametrize("name,arg", STUDIES, ids=IDS)
def test_study_runs_two_steps(name, arg, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  rows = study.run_study(config, str(tmp_path))
  assert [r["label"] for r in rows] == [run["label"] for run in config.runs]
  assert all(r["val_loss"] is not None for r in rows)
  assert os.path.exists(tmp_path / "results.md")


def test_gora_run_allocates_ranks_under_the_lora_budget(tmp_path):
  config = layer_ranks.get_config("init=gora,allocate=true,runlocal=true")
  model = loop.build_model(config, tasks.get(config.task))
  sites = adapter_sites(model)
  ranks = [a.lora_a.shape[1] for _, a in sites]
  features = [a.view.fan_in + a.view.fan_out for _, a in sites]
  assert len(ranks) == 4 and len(set(ranks)) > 1
  assert sum(r * f for r, f in zip(ranks, features)) <= 2 * sum(features)


def test_stella_config_uses_the_riemannian_optimizer():
  from configs import teacher_student  # pylint: disable=g-import-not-at-top
  config = teacher_student.get_config("method=stella,runlocal=true")
  assert config.optimizer.name == "stella" and config.method == "stella"
  with pytest.raises(ValueError, match="no LoRA init"):
    teacher_student.get_config("method=stella,init=pissa")


@pytest.mark.parametrize("name,default_steps", [("study_stella", 400), ("study_vit_init", 500)])
def test_study_size_args_set_steps_and_seeds(name, default_steps):
  module = importlib.import_module(f"configs.{name}")
  sized = module.get_config("steps=100,seeds=2")
  assert sized.seeds == (0, 1)
  for run in sized.runs:
    config = study.run_config(run, 0)
    assert (config.steps, config.eval_every, config.log_every) == (100, 20, 2)
  assert all(study.run_config(run, 0).steps == default_steps for run in module.get_config().runs)
  with pytest.raises(ValueError, match="seeds must be >= 1"):
    module.get_config("seeds=0")


def test_gora_lm_study_pretrain_steps_arg():
  sized = study.run_config(importlib.import_module("configs.study_gora").get_config(
      "task=lm,pretrain_steps=1000").pretrain, 0)
  assert (sized.steps, sized.eval_every) == (1000, 200)
  default = importlib.import_module("configs.study_gora").get_config("task=lm")
  assert study.run_config(default.pretrain, 0).steps == 2000

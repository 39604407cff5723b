"""Run a study: several configs (methods x seeds), then a comparison table and plot.

    python -m experiments.study --config=configs/study_quick.py [--workdir=results/study_quick]

A study config has ``name``, ``seeds``, ``runs`` and optionally ``pretrain``: each
run is a dict with a ``label``, the ``config`` file name in configs/, its ``arg``
string and ``overrides`` ({'a.b': value}); ``method`` and ``adapter`` (a dict of
hyperparameters) replace the config's adapter method and hyperparameters, for
methods whose hyperparameters the config's arg does not name. A ``pretrain`` run (same form) is
trained once first, in ``workdir/pretrain``, and every run starts from it
(``init_from``). Every (run, seed) trains in
``workdir/<label>/seed<k>`` (resuming if it was interrupted), then the study writes
``results.csv`` (one row per run and seed), ``results.md`` (mean and spread over
seeds: final validation loss, trainable parameters, optimizer-state bytes,
steps/s) and ``comparison.png`` (validation loss curves).
"""

from __future__ import annotations

import csv
import importlib
import os
import statistics

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/study_quick.py", "Study config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default results/<study name>).")

COLUMNS = ("label", "seed", "val_loss", "val_accuracy", "train_loss", "trainable_params",
           "optimizer_state_bytes", "steps_per_s")


def run_config(run: dict, seed: int):
  """The locked experiment config of one run of a study, with the seed and overrides applied."""
  module = importlib.import_module(f"configs.{run['config']}")
  config = module.get_config(run.get("arg") or None)
  with config.unlocked():
    config.seed = seed
    if "method" in run:
      config.method = run["method"]
      config.adapter = ml_collections.ConfigDict(dict(run.get("adapter", {})))
    elif "adapter" in run:
      raise ValueError(f"Run {run['label']!r}: 'adapter' hyperparameters need a 'method'.")
    for dotted, value in run.get("overrides", {}).items():
      target = config
      *parents, leaf = dotted.split(".")
      for parent in parents:
        target = getattr(target, parent)
      if leaf not in target:
        raise ValueError(f"Run {run['label']!r}: override {dotted!r} names no config field.")
      setattr(target, leaf, value)
  return config


def run_study(study, workdir: str) -> list[dict]:
  """Train every (run, seed) of ``study`` and write the table, CSV and plot into ``workdir``."""
  from experiments import loop  # pylint: disable=g-import-not-at-top
  from experiments import metrics  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  init_from = {}
  if study.get("pretrain"):
    pretrain_dir = os.path.join(workdir, "pretrain")
    print(f"== pretrain -> {pretrain_dir}")
    loop.train_and_evaluate(run_config(study.pretrain, study.pretrain.get("seed", 0)), pretrain_dir)
    init_from = {"init_from": os.path.abspath(pretrain_dir)}
  rows, curves = [], {}
  for run in study.runs:
    for seed in study.seeds:
      run_dir = os.path.join(workdir, run["label"], f"seed{seed}")
      print(f"== {run['label']} (seed {seed}) -> {run_dir}")
      run = dict(run, overrides={**run.get("overrides", {}), **init_from})
      summary = loop.train_and_evaluate(run_config(run, seed), run_dir)
      rows.append({"label": run["label"], "seed": seed, **{c: summary.get(c) for c in COLUMNS[2:]}})
      if seed == study.seeds[0]:
        curves[run["label"]] = [r for r in metrics.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                                if "val_loss" in r]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  table = markdown_table(rows)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# {study.name}\n\n{table}\n")
  metrics.plot_loss_curves(curves, os.path.join(workdir, "comparison.png"),
                           title=f"{study.name}: validation loss (seed {study.seeds[0]})")
  print(table)
  return rows


def markdown_table(rows: list[dict]) -> str:
  """Mean (and min..max over seeds) of each metric per run label."""
  accuracy = any(r.get("val_accuracy") is not None for r in rows)
  lines = ["| run | seeds | final val loss |" + (" val accuracy |" if accuracy else "")
           + " trainable params | optimizer state | steps/s |",
           "|---|---|---|" + ("---|" if accuracy else "") + "---|---|---|"]
  for label in dict.fromkeys(r["label"] for r in rows):
    group = [r for r in rows if r["label"] == label]
    losses = [r["val_loss"] for r in group]
    spread = f" ({min(losses):.4f}..{max(losses):.4f})" if len(losses) > 1 else ""
    acc = (f" {statistics.mean(r['val_accuracy'] for r in group):.3f} |" if accuracy else "")
    lines.append(
        f"| {label} | {len(group)} | {statistics.mean(losses):.4f}{spread} |{acc} "
        f"{group[0]['trainable_params']:,} | {group[0]['optimizer_state_bytes'] / 1024:,.1f} KiB | "
        f"{statistics.mean(r['steps_per_s'] for r in group):.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  study = _CONFIG.value
  run_study(study, _WORKDIR.value or os.path.join("results", study.name))


if __name__ == "__main__":
  app.run(main)

"""Reparameterized pretraining study: tiny GPT from scratch at equal steps, one run per method.

    python -m experiments.study --config=configs/study_reparam.py

Methods: every entry of configs/pretrain_reparam.methods (AdamW full rank, POET full and
block-stochastic, SLTrain, LOST, SST, ReLoRA, SwitchLoRA, NOBLE), plus GaLore (full-rank
weights, AdamW state projected to rank ``rank``), on the embedded English text. Every run
shares the learning rate (3e-3, cosine), the batches and the number of steps.

arg keys: runlocal (2 steps per run, for tests), steps, seeds (how many: seeds 0..seeds-1),
rank (of the low-rank methods and of GaLore's projector), only ('+'-separated labels to run,
e.g. only=relora+full; empty: all).
"""

import ml_collections

from configs import common
from configs import pretrain_reparam

DEFAULTS = dict(runlocal=False, steps=1000, seeds=2, rank=16, only="")


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  if args["seeds"] < 1:
    raise ValueError(f"seeds must be >= 1, got {args['seeds']}.")
  rank = args["rank"]
  labels = list(pretrain_reparam.methods(rank, 16, 100))
  overrides = {"steps": 2, "progress": False} if args["runlocal"] else {}
  shared = f"rank={rank}" + ("" if args["runlocal"] else f",steps={args['steps']}")
  galore = {"optimizer.name": "galore", "optimizer.kwargs": {"rank": rank}}
  config = ml_collections.ConfigDict()
  config.name = "study_reparam"
  config.seeds = (0,) if args["runlocal"] else tuple(range(args["seeds"]))
  runs = tuple(
      dict(label=label, config="pretrain_reparam", arg=f"method={label},{shared}",
           overrides=dict(overrides))
      for label in labels) + (
      dict(label="galore", config="pretrain_reparam", arg=f"method=full,{shared}",
           overrides=dict(overrides, **galore)),)
  only = [label for label in args["only"].split("+") if label]
  unknown = sorted(set(only) - {run["label"] for run in runs})
  if unknown:
    raise ValueError(f"only: unknown labels {unknown}; the study's runs are "
                     f"{[run['label'] for run in runs]}.")
  config.runs = tuple(run for run in runs if not only or run["label"] in only)
  return config

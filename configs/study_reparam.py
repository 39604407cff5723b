"""Reparameterized pretraining study: tiny GPT from scratch at equal steps, one run per method.

    python -m experiments.study --config=configs/study_reparam.py

Methods: every entry of configs/pretrain_reparam.methods (AdamW full rank, POET full and
block-stochastic, SLTrain, LOST, SST, ReLoRA, SwitchLoRA, NOBLE), on the embedded English text, 2 seeds.

arg keys: runlocal (2 steps per run, for tests), steps.
"""

import ml_collections

from configs import common
from configs import pretrain_reparam

DEFAULTS = dict(runlocal=False, steps=1000)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  labels = list(pretrain_reparam.methods(16, 16, 100))
  overrides = {"steps": 2, "progress": False} if args["runlocal"] else {"steps": args["steps"]}
  config = ml_collections.ConfigDict()
  config.name = "study_reparam"
  config.seeds = (0,) if args["runlocal"] else (0, 1)
  config.runs = tuple(
      dict(label=label, config="pretrain_reparam", arg=f"method={label}",
           overrides=dict(overrides))
      for label in labels)
  return config

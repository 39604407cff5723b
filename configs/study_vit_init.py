"""Structured (shift-filter) attention init vs standard init for a ViT on digits, small data.

    python -m experiments.study --config=configs/study_vit_init.py

configs/vit_digits.py with mean pooling, 200 training images, full training; five seeds;
validation accuracy and loss.

arg keys: train_examples, runlocal (2 steps per run and one seed, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(train_examples=200, runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  quick = {"steps": 2, "progress": False} if args["runlocal"] else {}
  base = f"method=full,pool=mean,train_examples={args['train_examples']}"
  config = ml_collections.ConfigDict()
  config.name = "study_vit_init"
  config.seeds = (0,) if args["runlocal"] else (0, 1, 2, 3, 4)
  config.runs = (
      dict(label="standard", config="vit_digits", arg=base, overrides=dict(quick)),
      dict(label="structured", config="vit_digits", arg=f"{base},structured_init=true",
           overrides=dict(quick)),
  )
  return config

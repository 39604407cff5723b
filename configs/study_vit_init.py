"""Structured (shift-filter) attention init vs standard init for a ViT on digits, small data.

    python -m experiments.study --config=configs/study_vit_init.py

configs/vit_digits.py with mean pooling, 200 training images, full training; five seeds;
validation accuracy and loss.

arg keys: train_examples, steps (0: the config's 500), seeds (how many: seeds 0..seeds-1),
runlocal (2 steps per run and one seed, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(train_examples=200, steps=0, seeds=5, runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  seeds, quick = common.study_sizes(args)
  base = f"method=full,pool=mean,train_examples={args['train_examples']}"
  config = ml_collections.ConfigDict()
  config.name = "study_vit_init"
  config.seeds = seeds
  config.runs = (
      dict(label="standard", config="vit_digits", arg=base, overrides=dict(quick)),
      dict(label="structured", config="vit_digits", arg=f"{base},structured_init=true",
           overrides=dict(quick)),
  )
  return config

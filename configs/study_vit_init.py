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
  if args["seeds"] < 1 or args["steps"] < 0:
    raise ValueError(f"seeds must be >= 1 and steps >= 0, got seeds={args['seeds']}, "
                     f"steps={args['steps']}.")
  if args["runlocal"]:
    quick = {"steps": 2, "progress": False}
  else:
    quick = common.step_overrides(args["steps"]) if args["steps"] else {}
  base = f"method=full,pool=mean,train_examples={args['train_examples']}"
  config = ml_collections.ConfigDict()
  config.name = "study_vit_init"
  config.seeds = (0,) if args["runlocal"] else tuple(range(args["seeds"]))
  config.runs = (
      dict(label="standard", config="vit_digits", arg=base, overrides=dict(quick)),
      dict(label="structured", config="vit_digits", arg=f"{base},structured_init=true",
           overrides=dict(quick)),
  )
  return config

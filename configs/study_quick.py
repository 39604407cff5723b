"""The quick study: full fine-tuning, LoRA, DoRA and PiSSA at equal rank, 2 seeds.

    python -m experiments.study --config=configs/study_quick.py

arg keys: runlocal (a few steps per run, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  rank = 4
  base = dict(config="teacher_student")
  methods = [
      ("full", "method=full"),
      ("lora", f"method=lora,rank={rank}"),
      ("dora", f"method=dora,rank={rank}"),
      ("pissa", f"method=lora,rank={rank},init=pissa"),
  ]
  runs = []
  for label, arg_string in methods:
    overrides = {}
    if args["runlocal"]:
      overrides.update({"steps": 4, "progress": False})
    runs.append(dict(base, label=label, arg=arg_string, overrides=overrides))
  config = ml_collections.ConfigDict()
  config.name = "study_quick"
  config.seeds = (0, 1)
  config.runs = tuple(runs)
  return config

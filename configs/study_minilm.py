"""Real fine-tuning: all-MiniLM-L6-v2 on pydoc topic classification, full / LoRA / DoRA / PiSSA.

    python -m experiments.study --config=configs/study_minilm.py

arg keys: runlocal (a few steps per run, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  quick = {"steps": 3, "progress": False} if args["runlocal"] else {}
  methods = [("full", "method=full"), ("lora", "method=lora"), ("dora", "method=dora"),
             ("pissa", "method=lora,init=pissa")]
  config = ml_collections.ConfigDict()
  config.name = "study_minilm"
  config.seeds = (0,)
  config.runs = tuple(dict(label=label, config="finetune_minilm", arg=arg_string,
                           overrides=dict(quick)) for label, arg_string in methods)
  return config

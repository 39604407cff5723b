"""The quick study: full fine-tuning, LoRA, DoRA and PiSSA at equal rank, 2 seeds.

    python -m experiments.study --config=configs/study_quick.py

A tiny byte-level GPT is pretrained once on the embedded English text (pydoc
topics); each method then adapts it to Python standard-library code (every
attention and MLP projection, rank 8). About 5 minutes on 2 CPU cores.

arg keys: runlocal (a few steps per run, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  quick = {"steps": 3, "progress": False} if args["runlocal"] else {}
  methods = [
      ("full", "method=full"),
      ("lora", "method=lora,rank=8"),
      ("dora", "method=dora,rank=8"),
      ("pissa", "method=lora,rank=8,init=pissa"),
  ]
  config = ml_collections.ConfigDict()
  config.name = "study_quick"
  config.seeds = (0, 1)
  config.pretrain = dict(label="pretrain", config="pretrain_lm", arg="method=full",
                         overrides=quick or {"steps": 2000})
  config.runs = tuple(dict(label=label, config="finetune_lm", arg=arg_string, overrides=dict(quick))
                      for label, arg_string in methods)
  return config

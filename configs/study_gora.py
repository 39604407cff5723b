"""GoRA vs LoRA at equal parameter budget.

    python -m experiments.study --config=configs/study_gora.py:task=layer_ranks
    python -m experiments.study --config=configs/study_gora.py:task=lm

task=layer_ranks: the per-layer-rank regression (configs/layer_ranks.py), uniform rank 2 on
all four layers vs GoRA (rank allocation under the same budget + gradient init) vs
allocation alone and the GoRA init alone. task=lm: a tiny GPT pretrained on English text
adapted to Python code (configs/finetune_lm.py, rank 8 on every projection), LoRA vs GoRA.
Three seeds.

arg keys: task (layer_ranks, lm), pretrain_steps (task=lm: steps of the pretraining run),
runlocal (2 steps per run and one seed, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(task="layer_ranks", pretrain_steps=2000, runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  quick = {"steps": 2, "progress": False} if args["runlocal"] else {}
  config = ml_collections.ConfigDict()
  config.name = f"study_gora_{args['task']}"
  config.seeds = (0,) if args["runlocal"] else (0, 1, 2)
  if args["task"] == "layer_ranks":
    methods = [
        ("lora", "rank=2"),
        ("gora", "rank=2,init=gora,allocate=true"),
        ("allocation_only", "rank=2,allocate=true"),
        ("gora_init_only", "rank=2,init=gora"),
    ]
    config.runs = tuple(dict(label=label, config="layer_ranks", arg=a, overrides=dict(quick))
                        for label, a in methods)
  elif args["task"] == "lm":
    methods = [("lora", "method=lora,rank=8"), ("gora", "method=lora,rank=8,init=gora,allocate=true")]
    config.pretrain = dict(label="pretrain", config="pretrain_lm", arg="method=full",
                           overrides=quick or common.step_overrides(args["pretrain_steps"]))
    config.runs = tuple(dict(label=label, config="finetune_lm", arg=a, overrides=dict(quick))
                        for label, a in methods)
  else:
    raise ValueError(f"task must be 'layer_ranks' or 'lm', got {args['task']!r}.")
  return config

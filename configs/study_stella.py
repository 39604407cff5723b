"""StelLA vs LoRA vs PiSSA at equal rank on teacher-student with a known low-rank target.

    python -m experiments.study --config=configs/study_stella.py

The hidden layer of a frozen MLP is adapted (rank 4) to a teacher whose update has rank 4;
LoRA and PiSSA train with Adam, StelLA with `stiefel(AdamW)` (U, V kept orthonormal), each at
learning rates 3e-3, 1e-2 and 3e-2 (the best rate differs between methods). Three seeds;
final validation MSE and loss curves. About 20 s per run on 2 CPU cores.

arg keys: steps (0: the config's 400), seeds (how many: seeds 0..seeds-1), runlocal (2 steps
per run and one seed, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(steps=0, seeds=3, runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  seeds, quick = common.study_sizes(args)
  base = "kind=low_rank,update_rank=4,rank=4"
  methods = [
      ("lora", f"method=lora,{base}"),
      ("pissa", f"method=lora,init=pissa,{base}"),
      ("stella", f"method=stella,{base}"),
  ]
  config = ml_collections.ConfigDict()
  config.name = "study_stella"
  config.seeds = seeds
  config.runs = tuple(dict(label=f"{label}_lr{lr:g}", config="teacher_student", arg=arg_string,
                           overrides={"optimizer.learning_rate": lr, **quick})
                      for label, arg_string in methods for lr in (3e-3, 1e-2, 3e-2))
  return config

"""Pretraining comparison of optimizers: a tiny GPT from scratch, same steps, a small LR sweep.

    python -m experiments.study --config=configs/study_optimizers.py

Each optimizer trains the tiny byte-level GPT of configs/pretrain_lm.py
(dim 64, depth 2) on the embedded English text for the same number of steps
(1000, cosine schedule with warmup, gradient clipping at 1), at three learning
rates around its usual value; the study table reports the final validation
loss and the optimizer-state bytes of each (run, learning rate). Methods:
AdamW, GaLore (SVD projector), DCT-GaLore (SVD-free DCT projector), FRUGAL
(Adam in the subspace, signSGD on the residual), Muon and Dion. The projected
methods take ``rank`` (and ``strategy``) as in lowrank_jax.optim.projection;
on matrices GaLore, FRUGAL and Dion use rank 16 of the 64-wide model. Muon and
Dion send the non-matrix parameters to AdamW at ``adam_learning_rate``. Not
run in CI (about 18 runs of 1000 steps); the test runs 2 steps of each.

arg keys: runlocal (2 steps per run, for tests), steps.
"""

import ml_collections

DEFAULTS = dict(runlocal=False, steps=1000)

# label -> (optimizer registry name, kwargs, learning rates swept)
OPTIMIZERS = {
    "adamw": ("adamw", {}, (1e-3, 3e-3, 1e-2)),
    "galore": ("galore", {"rank": 16}, (1e-3, 3e-3, 1e-2)),
    "dct_galore": ("galore", {"rank": 16, "strategy": "dct"}, (1e-3, 3e-3, 1e-2)),
    "frugal": ("frugal", {"rank": 16}, (1e-3, 3e-3, 1e-2)),
    "muon": ("muon", {"adam_learning_rate": 3e-3}, (0.01, 0.03, 0.1)),
    "dion": ("dion", {"rank": 16, "adam_learning_rate": 3e-3}, (0.01, 0.03, 0.1)),
}


def get_config(arg=None):
  from configs import common  # pylint: disable=g-import-not-at-top
  args = common.parse_arg(arg, DEFAULTS)
  steps = 2 if args["runlocal"] else args["steps"]
  config = ml_collections.ConfigDict()
  config.name = "study_optimizers"
  config.seeds = (0,)
  runs = []
  for label, (name, kwargs, rates) in OPTIMIZERS.items():
    for lr in rates[:1] if args["runlocal"] else rates:
      overrides = {"steps": steps, "optimizer.learning_rate": lr, "optimizer.kwargs": dict(kwargs)}
      if args["runlocal"]:
        overrides["progress"] = False
      runs.append(dict(label=f"{label}_lr{lr:g}", config="pretrain_lm",
                       arg=f"method=full,optimizer={name}" + (",runlocal=true" if args["runlocal"] else ""),
                       overrides=overrides))
  config.runs = tuple(runs)
  return config

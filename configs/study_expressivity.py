"""Expressivity of the adapters at a matched parameter budget, on teacher-student tasks.

    python -m experiments.study --config=configs/study_expressivity.py

A frozen MLP (16 -> 64 -> 64 -> 8) is adapted on its 64 x 64 middle layer to a
teacher whose update of that layer has a chosen structure: low rank (rank 4),
full rank (dense Gaussian), orthogonal (a rotation of W0) or frequency sparse
(a few 2-D DCT coefficients). Every method gets about 512 trainable parameters
(LoRA rank 4), except where its structure fixes fewer (noted in the docs). The
study writes grid.md / grid.png: final validation MSE, methods by target kinds.
About 15 minutes on 2 CPU cores.

arg keys: runlocal (3 steps per run, two methods, for tests).
"""

import ml_collections

from configs import common

DEFAULTS = dict(runlocal=False)

KINDS = ("low_rank", "full_rank", "orthogonal", "frequency_sparse")

# label -> (method, hyperparameters): about 512 trainable parameters on a 64 x 64 layer.
METHODS = {
    "lora": ("lora", dict(rank=4)),
    "dora": ("dora", dict(rank=4)),
    "pissa": ("lora", dict(rank=4, init="pissa")),
    "adalora": ("adalora", dict(rank=4)),
    "sorsa": ("sorsa", dict(rank=4)),
    "stella": ("stella", dict(rank=4)),
    "lora_asym": ("lora_asym", dict(rank=8)),
    "lora_xs": ("lora_xs", dict(rank=22)),
    "svft": ("svft", dict(core="banded", core_k=4)),
    "singlora": ("singlora", dict(rank=8)),
    "capaboost": ("capaboost", dict(rank=4)),
    "vera": ("vera", dict(rank=448)),
    "loha": ("loha", dict(rank=2)),
    "lokr": ("lokr", dict(rank=8, kron_shape=(2, 2))),
    "soka": ("soka", dict(terms=4)),
    "oft": ("oft", dict(block_size=16)),
    "boft": ("boft", dict()),
    "hra": ("hra", dict(rank=8)),
    "mora": ("mora", dict(rank=4)),
    "miss": ("miss", dict(rank=8)),
    "hut": ("hut", dict(rank=4)),
    "fourierft": ("fourierft", dict(n_frequency=512)),
    "loca": ("loca", dict(n_frequency=512)),
}


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  steps = 3 if args["runlocal"] else 400
  overrides = {"steps": steps, "checkpoint_every": steps, "progress": not args["runlocal"]}
  methods = dict(list(METHODS.items())[:2]) if args["runlocal"] else METHODS
  config = ml_collections.ConfigDict()
  config.name = "study_expressivity"
  config.seeds = (0,)
  config.runs = tuple(
      dict(label=f"{label}/{kind}", config="teacher_student", arg=f"kind={kind}",
           method=method, adapter=hyperparameters, overrides=overrides)
      for label, (method, hyperparameters) in methods.items() for kind in KINDS)
  return config

"""Per-layer-rank regression: every layer of a frozen MLP is adapted, the teacher changed only
some layers, each with its own rank (GoRA's synthetic setting).

    python -m experiments.train --config=configs/layer_ranks.py:init=gora,allocate=true \
        --workdir=/tmp/layer_ranks_gora

arg keys: method (an adapter name), rank (r_ref: the uniform rank, and the budget of
allocation), init (a LoRA init; 'gora' for GoRA), allocate (GoRA rank allocation),
calibration_batches, runlocal. Teacher updates of ranks (0, 6, 0, 2) on layers/0..3.
"""

import ml_collections

from configs import common

DEFAULTS = dict(method="lora", rank=2, init="default", allocate=False, calibration_batches=0,
                runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  config = ml_collections.ConfigDict()
  config.task = "layer_ranks"
  config.model = ml_collections.ConfigDict(dict(d_in=16, d_hidden=48, d_out=8, base_seed=0))
  config.data = ml_collections.ConfigDict(dict(
      task_seed=1, update_ranks=(0, 6, 0, 2), update_scale=0.5, n_train=2048, n_val=512))
  common.training_fields(config, steps=2 if args["runlocal"] else 400, batch_size=64,
                         learning_rate=1e-2, optimizer="adam")
  common.adapter_fields(config, args["method"], [r"layers/\d+"],
                        **common.adapter_hyperparams(args["method"], args["rank"], args["init"]))
  common.calibration_fields(config, init=args["init"], calibration_batches=args["calibration_batches"],
                            allocate=args["allocate"])
  config.lock()
  return config

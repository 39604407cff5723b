"""Adapt a pretrained byte-level GPT (a pretrain_lm workdir) to Python standard-library code.

    python -m experiments.train --config=configs/pretrain_lm.py --workdir=/tmp/lm
    python -m experiments.train --config=configs/finetune_lm.py:method=dora,rank=8 \
        --config.init_from=/tmp/lm --workdir=/tmp/ft_dora

arg keys: method (full or an adapter name), rank, init (a LoRA init), targets (a preset of
lowrank_jax.models.presets for gpt: attention, qv, mlp, all), size (must match the pretrained
model), calibration_batches and allocate (GoRA: ``init=gora,allocate=true`` allocates the
ranks under the budget of rank-``rank`` LoRA from calibration gradients), runlocal. Without init_from the base model is random (a smoke test, not a fine-tune).
"""


from configs import common
from configs import pretrain_lm

DEFAULTS = dict(method="lora", rank=8, init="default", targets="all", size="tiny",
                calibration_batches=0, allocate=False, runlocal=False)
TARGETS = {
    "attention": r"blocks/\d+/attn/(query|key|value|out)",
    "qv": r"blocks/\d+/attn/(query|value)",
    "mlp": r"blocks/\d+/mlp/(gate|up|down)",
    "all": pretrain_lm.ALL_PROJECTIONS,
}


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  if args["targets"] not in TARGETS:
    raise ValueError(f"targets must be one of {sorted(TARGETS)}, got {args['targets']!r}.")
  config = pretrain_lm.get_config(f"size={args['size']},domain=python,runlocal={args['runlocal']}")
  with config.unlocked():
    config.steps = 3 if args["runlocal"] else 300
    config.optimizer.learning_rate = 1e-3 if args["method"] == "full" else 3e-3
    config.optimizer.warmup_steps = 0 if args["runlocal"] else 20
    config.log_every = max(1, config.steps // 50)
    config.eval_every = max(1, config.steps // 5)
    config.checkpoint_every = max(1, config.steps // 5)
    common.adapter_fields(config, args["method"], [TARGETS[args["targets"]]],
                          **common.adapter_hyperparams(args["method"], args["rank"], args["init"]))
    common.calibration_fields(config, init=args["init"],
                              calibration_batches=args["calibration_batches"],
                              allocate=args["allocate"])
  config.lock()
  return config

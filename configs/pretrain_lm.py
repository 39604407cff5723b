"""Pretrain a tiny byte-level GPT on the embedded English text (pydoc topics).

    python -m experiments.train --config=configs/pretrain_lm.py:method=full --workdir=/tmp/lm

arg keys: method ('full', or an adapter/reparameterization name applied to every projection),
rank, optimizer (a lowrank_jax.optim or optax name), domain (english, python), size (tiny, small),
runlocal.
"""

import ml_collections

from configs import common

DEFAULTS = dict(method="full", rank=8, optimizer="adamw", domain="english", size="tiny",
                runlocal=False)
SIZES = {
    "tiny": dict(dim=64, depth=2, heads=4, mlp_dim=172),
    "small": dict(dim=128, depth=4, heads=4, mlp_dim=344),
}
ALL_PROJECTIONS = r"blocks/\d+/(attn/(query|key|value|out)|mlp/(gate|up|down))"


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  if args["size"] not in SIZES:
    raise ValueError(f"size must be one of {sorted(SIZES)}, got {args['size']!r}.")
  config = ml_collections.ConfigDict()
  config.task = "lm"
  config.model = ml_collections.ConfigDict(dict(vocab_size=256, max_len=128, **SIZES[args["size"]]))
  config.data = ml_collections.ConfigDict(dict(
      domain=args["domain"], seq_len=64, val_fraction=0.1, eval_batches=4, eval_batch_size=16))
  common.training_fields(config, steps=3 if args["runlocal"] else 600, batch_size=16,
                         learning_rate=3e-3, optimizer=args["optimizer"])
  config.optimizer.warmup_steps = 0 if args["runlocal"] else 50
  config.optimizer.schedule = "cosine"
  config.optimizer.clip_norm = 1.0
  config.init_from = ""
  rank = args["rank"]
  common.adapter_fields(config, args["method"], [ALL_PROJECTIONS],
                        **({} if args["method"] == "full" else dict(rank=rank, alpha=2.0 * rank)))
  config.lock()
  return config

"""Pretrain a tiny byte-level GPT from scratch with a reparameterized training method.

    python -m experiments.train --config=configs/pretrain_reparam.py:method=poet_block \
        --workdir=/tmp/poet

Every attention and MLP projection is reparameterized (or trained densely for 'full');
embeddings and norms are trained as usual (``train_also``). The model has mlp_dim 192 so that
POET's block size divides every projection. All methods train for the same number of steps on
the same batches.

arg keys: method (a key of methods()), rank (for the low-rank methods), block_size (POET-BS),
event_every (period of the method's event), steps, runlocal.
"""


from configs import common
from configs import pretrain_lm

DEFAULTS = dict(method="full", rank=16, block_size=16, event_every=100, steps=1000,
                runlocal=False)
NON_PROJECTIONS = [r"embed", r"norm", r"head", r"blocks/\d+/(attn_norm|mlp_norm)"]


def methods(rank: int, block_size: int, event_every: int) -> dict:
  """label -> (adapter name or 'full', hyperparameters, events)."""
  low_rank = dict(rank=rank, alpha=float(rank))
  poet_events = (("poet_merge_reinit", dict(every=event_every)),)
  return {
      "full": ("full", {}, ()),
      "poet": ("poet", dict(w0_init="normalized_gaussian"), poet_events),
      "poet_block": ("poet", dict(block_size=block_size, w0_init="normalized_gaussian"),
                     poet_events),
      "sltrain": ("sltrain", dict(low_rank, sparsity=0.03), ()),
      # gamma 0.5 with alpha = 2r gives both LOST branches the multiplier 1 (docs/reparam.md).
      "lost": ("lost", dict(rank=rank, alpha=2.0 * rank, gamma=0.5, sparsity=0.1), ()),
      "sst": ("sst", dict(rank=rank), (("sst_resample", dict(every=event_every)),)),
      "relora": ("relora", low_rank, (("relora_restart", dict(every=event_every)),)),
      "switchlora": ("switchlora", dict(rank=rank, alpha=1.0),
                     (("switchlora_switch", dict(every=10, interval=40.0)),)),
      "noble": ("noble", dict(rank=rank), ()),
  }


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  table = methods(args["rank"], args["block_size"], args["event_every"])
  if args["method"] not in table:
    raise ValueError(f"method must be one of {sorted(table)}, got {args['method']!r}.")
  name, hyperparams, events = table[args["method"]]
  config = pretrain_lm.get_config(f"method=full,runlocal={args['runlocal']}")
  with config.unlocked():
    config.model.mlp_dim = 192
    steps = 3 if args["runlocal"] else args["steps"]
    config.steps = steps
    config.log_every = max(1, steps // 50)
    config.eval_every = max(1, steps // 5)
    config.checkpoint_every = max(1, steps // 5)
    common.adapter_fields(config, name, [pretrain_lm.ALL_PROJECTIONS], **hyperparams)
    config.train_also = NON_PROJECTIONS if name != "full" else []
    config.events = [(event, dict(kwargs)) for event, kwargs in events]
    if name == "relora":  # the paper's jagged schedule, re-warming up over half of each period
      config.optimizer.restart_every = args["event_every"]   # (docs/reparam.md: 10% was worse)
      config.optimizer.restart_warmup_steps = max(1, args["event_every"] // 2)
  config.lock()
  return config

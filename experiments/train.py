"""Train one config.

    python -m experiments.train --config=configs/NAME.py:key=value,... \
        [--config.a.b=value ...] --workdir=DIR

The config is locked: a mistyped ``--config.`` field fails with the list of
fields. Re-running with the same workdir resumes from its latest checkpoint.
Multi-host: pass ``--distributed`` on every host (jax.distributed.initialize
reads the coordinator from the environment, as on Cloud TPU VMs).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from experiments import loop  # pylint: disable=g-import-not-at-top
  summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    for key, value in sorted(summary.items()):
      print(f"{key}: {value}")


if __name__ == "__main__":
  app.run(main)

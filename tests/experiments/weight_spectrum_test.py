"""weight_spectrum: POET-BS keeps every singular value of its weights, dense training does not."""

import pytest

from configs import pretrain_reparam
from experiments import loop
from experiments import weight_spectrum


def _train(method, workdir):
  config = pretrain_reparam.get_config(f"method={method},runlocal=true")
  with config.unlocked():
    config.progress = False
  loop.train_and_evaluate(config, str(workdir))
  return weight_spectrum.run_spectra(str(workdir))


@pytest.mark.slow
def test_poet_block_spectrum_is_kept_and_full_training_changes_it(tmp_path):
  poet = _train("poet_block", tmp_path / "poet_block")
  full = _train("full", tmp_path / "full")
  assert set(poet) == set(full) and len(poet) == 14  # 2 blocks x 7 projections
  assert weight_spectrum.max_relative_change(poet) < 1e-4
  assert weight_spectrum.max_relative_change(full) > 1e-3


def test_relative_change_is_the_largest_shift_over_the_top_singular_value():
  spectrum = {"init": [4.0, 2.0, 1.0], "trained": [4.0, 2.5, 0.0]}
  assert weight_spectrum.relative_change(spectrum) == pytest.approx(0.25)
  sites = {"a": spectrum, "b": {"init": [1.0], "trained": [1.0]}}
  assert weight_spectrum.max_relative_change(sites) == pytest.approx(0.25)

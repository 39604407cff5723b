"""The README's first command stays true: the quickstart runs and every method learns."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_runs_and_lowers_every_loss():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-m", "experiments.quickstart", "--steps=60"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  table = result.stdout.split("method ")[-1].splitlines()[1:]
  rows = {line.split()[0]: line.split() for line in table if line.strip()}
  assert set(rows) == {"full", "lora", "dora", "pissa"}
  for name, row in rows.items():
    initial, final, merge_error = float(row[1]), float(row[2]), float(row[4])
    assert final < initial, (name, row)
    assert merge_error < 1e-4, (name, row)

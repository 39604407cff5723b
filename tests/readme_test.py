"""README's two opening commands stay true: CI runs the README's test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
  readme = open(os.path.join(ROOT, "README.md")).read()
  block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
  return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_main_job_and_test_commands():
  main_job, tests = _commands()
  assert main_job.startswith("pip install -e") and "python -m experiments." in main_job
  assert tests.startswith("pip install -e") and "python -m pytest" in tests


def test_ci_runs_the_readme_install_and_test_command():
  _, tests = _commands()
  install, test = tests.split(" && ")
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert install.replace("pip install", "python3 -m pip install") in ci
  assert test.replace("python -m", "python3 -m") in ci

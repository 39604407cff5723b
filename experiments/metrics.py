"""Metrics of a run: JSONL, TensorBoard event files and the loss-curve plot."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class MetricWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``.

  On resume from step k, lines for steps after k (written after the last
  checkpoint by a run that was killed) are dropped, so the file matches the
  restored state.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    with open(self.path, "w") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, **scalars: Any) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    self.tensorboard.close()


def read_metrics(path: str) -> list[dict[str, float]]:
  """The records of a metrics.jsonl file (empty if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(curves: dict[str, list[dict[str, float]]], path: str, title: str = "") -> None:
  """Plot train (solid) and validation (dashed, markers) loss per run into a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (name, records) in enumerate(curves.items()):
    color = f"C{i % 10}"
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
      steps, losses = np.array(train).T
      ax.plot(steps, losses, color=color, alpha=0.8, label=f"{name} train")
    if val:
      steps, losses = np.array(val).T
      ax.plot(steps, losses, "o--", color=color, label=f"{name} validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_grid(values: dict[tuple[str, str], float], path: str, title: str = "",
              label: str = "final validation loss") -> None:
  """A heatmap of ``values[(row, column)]`` (log color scale), each cell annotated, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.colors  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = list(dict.fromkeys(r for r, _ in values))
  columns = list(dict.fromkeys(c for _, c in values))
  grid = np.full((len(rows), len(columns)), np.nan)
  for (r, c), v in values.items():
    grid[rows.index(r), columns.index(c)] = v
  positive = grid[np.isfinite(grid) & (grid > 0)]
  norm = (matplotlib.colors.LogNorm(positive.min(), positive.max()) if positive.size else None)
  fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2.5, 0.32 * len(rows) + 1.5))
  image = ax.imshow(grid, aspect="auto", cmap="viridis_r", norm=norm)
  for i in range(len(rows)):
    for j in range(len(columns)):
      if np.isfinite(grid[i, j]):
        ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=7, color="w")
  ax.set_xticks(range(len(columns)), columns, fontsize=8)
  ax.set_yticks(range(len(rows)), rows, fontsize=8)
  fig.colorbar(image, ax=ax, label=label)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(calls, repeats: int) -> list[float]:
  """Median time of each ``(fn, args)``, timed in alternation so drift hits all alike."""
  return [statistics.median(t) for t in alternating_seconds(calls, repeats)]


def alternating_seconds(calls, repeats: int) -> list[list[float]]:
  """The ``repeats`` times of each ``(fn, args)`` (after 2 warm-up calls), timed in alternation."""
  for fn, args in calls:  # compile and warm up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(calls):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - start)
  return times

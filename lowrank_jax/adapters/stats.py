"""Per-site calibration statistics as the adapters read them.

``calibration`` (the argument of ``lrj.attach`` and ``spec.build``) maps a
module path ('blocks/0/attn/query') to a `SiteStats`, all float32, in the
(fan_in, fan_out) matrix layout of `lowrank_jax.adapters.layers.LayerView`.
`lowrank_jax.calibrate.collect` computes them; this module sits below
`lowrank_jax.attach` so that every adapter can read them.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax

Array = jax.Array


class SiteStats(NamedTuple):
  """Per-site calibration statistics (None where not collected).

  Attributes:
    grad: mean gradient of the loss w.r.t. the frozen kernel, (fan_in, fan_out).
    input_sq_norm: sum over calibration tokens of x_j^2 per input feature, (fan_in,).
    input_gram: X^T X over calibration tokens, (fan_in, fan_in).
    num_tokens: number of input rows the statistics are summed over.
  """

  grad: Array | None = None
  input_sq_norm: Array | None = None
  input_gram: Array | None = None
  num_tokens: int = 0


def site_stats(calibration: Mapping[str, SiteStats] | None, path: str, method: str,
               needs: str) -> Array:
  """The statistic ``needs`` (a SiteStats field) of site ``path``, or a clear error."""
  if calibration is None:
    raise ValueError(
        f"{method} at '{path}' needs calibration statistics ({needs}); pass "
        "calibration=lrj.calibrate.collect(...) to lrj.attach.")
  if path not in calibration:
    raise ValueError(
        f"{method} at '{path}': the calibration statistics have no site '{path}' (they hold "
        f"{sorted(calibration)[:8]}...); were they collected on another model or with other rules?")
  value = getattr(calibration[path], needs)
  if value is None:
    raise ValueError(f"{method} at '{path}' needs '{needs}' in its calibration statistics, which "
                     "were collected without it.")
  return value

"""Calibration statistics lookup: clear errors for missing or mismatched statistics."""

import jax.numpy as jnp
import pytest

from lowrank_jax import calibrate


def test_site_stats_lookup_and_errors():
  grad = jnp.ones((4, 3))
  stats = {"blocks/0/attn/query": calibrate.SiteStats(grad=grad, num_tokens=10)}
  assert calibrate.site_stats(stats, "blocks/0/attn/query", "gora", "grad") is grad
  with pytest.raises(ValueError, match="needs calibration"):
    calibrate.site_stats(None, "blocks/0/attn/query", "gora", "grad")
  with pytest.raises(ValueError, match="another model"):
    calibrate.site_stats(stats, "blocks/1/attn/query", "gora", "grad")
  with pytest.raises(ValueError, match="input_gram"):
    calibrate.site_stats(stats, "blocks/0/attn/query", "gora", "input_gram")

"""The optimizer registry: lookup by name and clear errors."""

import optax
import pytest

from lowrank_jax.optim import registry


def test_register_get_and_errors():
  @registry.register("_test_sgd", example={"momentum": 0.5})
  def _test_sgd(learning_rate, momentum=0.0):
    return optax.sgd(learning_rate, momentum=momentum)

  try:
    assert "_test_sgd" in registry.names()
    assert registry.entry("_test_sgd").example == {"momentum": 0.5}
    tx = registry.get("_test_sgd", learning_rate=0.1, momentum=0.9)
    assert isinstance(tx, optax.GradientTransformation)
    with pytest.raises(ValueError, match="accepted"):
      registry.get("_test_sgd", learning_rate=0.1, mommentum=0.9)
    with pytest.raises(ValueError, match="known optimizers"):
      registry.get("no_such_optimizer")
    with pytest.raises(ValueError, match="already registered"):
      registry.register("_test_sgd")(lambda learning_rate: optax.sgd(learning_rate))
  finally:
    registry._REGISTRY.pop("_test_sgd", None)

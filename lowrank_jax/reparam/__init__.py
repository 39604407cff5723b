"""Training-time reparameterizations of dense layers and step-boundary events."""

from lowrank_jax.reparam.events import Event

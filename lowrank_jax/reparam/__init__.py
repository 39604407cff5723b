"""Training-time reparameterizations of dense layers and step-boundary events."""

from lowrank_jax.reparam import events
from lowrank_jax.reparam.events import Event
from lowrank_jax.reparam import poet

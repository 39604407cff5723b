"""Training-time reparameterizations of dense layers and step-boundary events."""

from lowrank_jax.reparam import events
from lowrank_jax.reparam.events import Event
from lowrank_jax.reparam import poet
from lowrank_jax.reparam import relora
from lowrank_jax.reparam import switchlora
from lowrank_jax.reparam import sparse_plus_low_rank
from lowrank_jax.reparam import sst
from lowrank_jax.reparam import weight_norm
from lowrank_jax.reparam import monarch
from lowrank_jax.reparam import scaling
from lowrank_jax.reparam import noble

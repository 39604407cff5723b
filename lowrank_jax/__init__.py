"""lowrank_jax: low-rank adaptation, reparameterized training and low-rank optimizers for JAX."""

from lowrank_jax import adapters
from lowrank_jax import functional
from lowrank_jax import linalg
from lowrank_jax.adapters.base import AdapterBuffer
from lowrank_jax.adapters.base import AdapterParam
from lowrank_jax.adapters.base import AdapterSpec
from lowrank_jax.attach import attach
from lowrank_jax.attach import merge
from lowrank_jax.attach import summary
from lowrank_jax.attach import unmerge

__version__ = "0.1.0"
from lowrank_jax import reparam
from lowrank_jax import calibrate

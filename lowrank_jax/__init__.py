"""lowrank_jax: low-rank adaptation, reparameterized training and low-rank optimizers for JAX."""

from lowrank_jax import linalg

__version__ = "0.1.0"

"""Low-rank and structured optimizers as optax GradientTransformations.

``lrj.optim.get(name, **hp)`` builds a registered transform by name;
``lrj.optim.names()`` lists them.
"""

from lowrank_jax.optim.registry import get
from lowrank_jax.optim.registry import names
from lowrank_jax.optim.registry import register
from lowrank_jax.optim import riemannian
from lowrank_jax.optim.riemannian import stiefel
from lowrank_jax.optim import lora

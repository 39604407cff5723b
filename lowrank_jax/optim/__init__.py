"""Low-rank and structured optimizers as optax GradientTransformations.

``lrj.optim.get(name, **hp)`` builds a registered transform by name;
``lrj.optim.names()`` lists them.
"""

from lowrank_jax.optim.registry import get
from lowrank_jax.optim.registry import names
from lowrank_jax.optim.registry import register
from lowrank_jax.optim import labels
from lowrank_jax.optim import projection
from lowrank_jax.optim.galore import flora
from lowrank_jax.optim.galore import galore
from lowrank_jax.optim.galore import galore_dct
from lowrank_jax.optim.galore import galore_plus
from lowrank_jax.optim.galore import online_subspace_descent
from lowrank_jax.optim.galore import scale_by_galore
from lowrank_jax.optim.frugal import frugal
from lowrank_jax.optim.frugal import scale_by_frugal
from lowrank_jax.optim.labels import label_by_path
from lowrank_jax.optim.labels import mask_by_ndim
from lowrank_jax.optim import orthogonal
from lowrank_jax.optim import weight_decay
from lowrank_jax.optim.orthogonal import auon
from lowrank_jax.optim.orthogonal import dion
from lowrank_jax.optim.orthogonal import mars_m
from lowrank_jax.optim.orthogonal import muon
from lowrank_jax.optim.orthogonal import scale_by_auon
from lowrank_jax.optim.orthogonal import scale_by_dion
from lowrank_jax.optim.orthogonal import scale_by_mars_m
from lowrank_jax.optim.orthogonal import scale_by_muon
from lowrank_jax.optim.weight_decay import cautious_adamw
from lowrank_jax.optim.weight_decay import cautious_weight_decay
from lowrank_jax.optim import riemannian
from lowrank_jax.optim.riemannian import stiefel
from lowrank_jax.optim import lora
from lowrank_jax.optim import adaprelora

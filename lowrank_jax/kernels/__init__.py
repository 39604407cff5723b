"""Pallas kernels with XLA fallbacks for the hot paths of low-rank methods.

Each op (one file) has a jnp ``reference``, a TPU-style Pallas kernel, a
``BlockSizes`` dataclass and a dispatching entry point taking
``implementation=None|'xla'|'pallas'`` and ``interpret=`` (see `_common`).
"""

from lowrank_jax.kernels import lora_matmul
from lowrank_jax.kernels import grouped_lora
from lowrank_jax.kernels import newton_schulz
from lowrank_jax.kernels import dora_norm

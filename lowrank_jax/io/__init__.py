"""Saving and loading: orbax checkpoints of adapters or full state; the PEFT adapter format."""

from lowrank_jax.io.checkpoint import describe_adapters
from lowrank_jax.io.checkpoint import restore_adapters
from lowrank_jax.io.checkpoint import restore_state
from lowrank_jax.io.checkpoint import save_adapters
from lowrank_jax.io.checkpoint import save_state
from lowrank_jax.io.peft import PeftFormatError
from lowrank_jax.io.peft import export_peft
from lowrank_jax.io.peft import import_peft

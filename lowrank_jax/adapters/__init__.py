"""Adapter methods: specs, modules and the registry.

``lrj.adapters.get(name, **hp)`` builds a spec by registry name;
``lrj.adapters.lora(rank=8, alpha=16)`` etc. are the per-method factories.
"""

from lowrank_jax.adapters.base import Adapter
from lowrank_jax.adapters.base import AdapterBuffer
from lowrank_jax.adapters.base import AdapterParam
from lowrank_jax.adapters.base import AdapterSpec
from lowrank_jax.adapters.base import get
from lowrank_jax.adapters.base import names
from lowrank_jax.adapters.base import register
from lowrank_jax.adapters.base import factory
from lowrank_jax.adapters.layers import LayerView
from lowrank_jax.adapters.layers import UnsupportedLayerError
from lowrank_jax.adapters.layers import view_of
from lowrank_jax.adapters.lora import LoRA
from lowrank_jax.adapters.lora import LoRASpec
from lowrank_jax.adapters.dora import DoRA
from lowrank_jax.adapters.dora import DoRASpec

lora = factory(LoRASpec)
dora = factory(DoRASpec)
from lowrank_jax.adapters.highrank import BatSpec
from lowrank_jax.adapters.highrank import HUTSpec
from lowrank_jax.adapters.highrank import MiSSSpec
from lowrank_jax.adapters.highrank import MoRASpec
mora = factory(MoRASpec)
miss = factory(MiSSSpec)
bat = factory(BatSpec)
hut = factory(HUTSpec)

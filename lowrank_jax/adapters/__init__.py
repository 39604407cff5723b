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
from lowrank_jax.adapters import factored_methods as _factored_methods
from lowrank_jax.adapters import adalora as _adalora
from lowrank_jax.adapters import regularizers
lora_xs = factory(_factored_methods.LoRAXSSpec)
lora_sb = factory(_factored_methods.LoRASBSpec)
svft = factory(_factored_methods.SVFTSpec)
svfit = factory(_factored_methods.SVFitSpec)
vectorfit = factory(_factored_methods.VectorFitSpec)
sorsa = factory(_factored_methods.SORSASpec)
edora = factory(_factored_methods.EDoRASpec)
nlora = factory(_factored_methods.NLoRASpec)
slora = factory(_factored_methods.SLoRASpec)
inttune = factory(_factored_methods.IntTuneSpec)
pmss = factory(_factored_methods.PMSSSpec)
lora_mini = factory(_factored_methods.LoRAMiniSpec)
lora_asym = factory(_factored_methods.AsymmetricLoRASpec)
singlora = factory(_factored_methods.SingLoRASpec)
lora_dropout = factory(_factored_methods.LoRADropoutSpec)
capaboost = factory(_factored_methods.CapaBoostSpec)
adalora = factory(_adalora.AdaLoRASpec)

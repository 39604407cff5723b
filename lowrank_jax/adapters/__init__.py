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
from lowrank_jax.reparam.poet import POETSpec  # pylint: disable=g-bad-import-order
poet = factory(POETSpec)
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
from lowrank_jax.adapters.stella import Stella
from lowrank_jax.adapters.stella import StellaSpec

stella = factory(StellaSpec)
from lowrank_jax.adapters.spectral import FourierFT
from lowrank_jax.adapters.spectral import FourierFTSpec
from lowrank_jax.adapters.spectral import LoCA
from lowrank_jax.adapters.spectral import LoCASpec
from lowrank_jax.adapters.bottleneck import AdapterTune
from lowrank_jax.adapters.bottleneck import AdapterTuneSpec
from lowrank_jax.adapters.bottleneck import MAP
from lowrank_jax.adapters.bottleneck import MAPSpec

fourierft = factory(FourierFTSpec)
loca = factory(LoCASpec)
adaptertune = factory(AdapterTuneSpec)
map = factory(MAPSpec)
from lowrank_jax.reparam.relora import ReLoRASpec  # pylint: disable=g-bad-import-order
relora = factory(ReLoRASpec)
from lowrank_jax.reparam.switchlora import SwitchLoRASpec  # pylint: disable=g-bad-import-order
switchlora = factory(SwitchLoRASpec)
from lowrank_jax.reparam.sparse_plus_low_rank import LOSTSpec  # pylint: disable=g-bad-import-order
from lowrank_jax.reparam.sparse_plus_low_rank import SLTrainSpec  # pylint: disable=g-bad-import-order
sltrain = factory(SLTrainSpec)
lost = factory(LOSTSpec)
from lowrank_jax.reparam.sst import SSTSpec  # pylint: disable=g-bad-import-order
sst = factory(SSTSpec)
from lowrank_jax.reparam.weight_norm import WeightNormSpec  # pylint: disable=g-bad-import-order
weight_norm = factory(WeightNormSpec)
from lowrank_jax.reparam.monarch import BTTSpec  # pylint: disable=g-bad-import-order
from lowrank_jax.reparam.monarch import MonarchSpec  # pylint: disable=g-bad-import-order
monarch = factory(MonarchSpec)
btt = factory(BTTSpec)
from lowrank_jax.adapters.products import VeRASpec
from lowrank_jax.adapters.products import LoHaSpec
from lowrank_jax.adapters.products import LoKrSpec
from lowrank_jax.adapters.products import CompacterSpec
from lowrank_jax.adapters.products import SoKASpec

vera = factory(VeRASpec)
loha = factory(LoHaSpec)
lokr = factory(LoKrSpec)
compacter = factory(CompacterSpec)
soka = factory(SoKASpec)
from lowrank_jax.adapters.orthogonal import OFTSpec
from lowrank_jax.adapters.orthogonal import BOFTSpec
from lowrank_jax.adapters.orthogonal import HRASpec
from lowrank_jax.adapters.orthogonal import hra_penalty

oft = factory(OFTSpec)
boft = factory(BOFTSpec)
hra = factory(HRASpec)
from lowrank_jax.adapters.mixture import CoMoLSpec

comol = factory(CoMoLSpec)
from lowrank_jax.adapters.highrank import BatSpec
from lowrank_jax.adapters.highrank import HUTSpec
from lowrank_jax.adapters.highrank import MiSSSpec
from lowrank_jax.adapters.highrank import MoRASpec
mora = factory(MoRASpec)
miss = factory(MiSSSpec)
bat = factory(BatSpec)
hut = factory(HUTSpec)
from lowrank_jax.reparam.noble import NOBLESpec  # pylint: disable=g-bad-import-order
noble = factory(NOBLESpec)

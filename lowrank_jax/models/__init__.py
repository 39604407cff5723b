"""Reference Flax NNX models: MLP, GPT decoder, ViT, BERT encoder (HF layout)."""

from lowrank_jax.models import bert
from lowrank_jax.models import gpt
from lowrank_jax.models import mlp
from lowrank_jax.models import presets
from lowrank_jax.models import vit

"""LoRA training step time through lrj.functional (Linen ViT) against lrj.attach (NNX ViT).

    python -m benchmarks.functional_overhead [--quick] [--dim=256] [--depth=6] [--batch=64]

The same ViT, the same weights and the same LoRA (rank r on every attention and
MLP projection) trained with Adam, once through the NNX front end
(``lrj.attach``, a jitted step over ``nnx.split(model, lrj.AdapterParam, ...)``, the
frozen state passed as an argument as the functional step's base params are)
and once through the functional front end on the Linen twin
(``lrj.functional.adapt``, a jitted step over ``adapter_params``). Both steps
are timed in alternation in the same run (median); the target ratio
functional / NNX is within 1.05. ``--quick`` runs the smallest setting to
check the script. Prints a table and writes benchmarks/results/functional_overhead.json.
"""

from __future__ import annotations

import json
import os
import platform
import re

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags
from flax import nnx

import lowrank_jax as lrj
from benchmarks.timing import median_seconds
from lowrank_jax.models import vit
from lowrank_jax.models import vit_linen

_QUICK = flags.DEFINE_bool("quick", False, "Smallest setting, to check that the script runs.")
_DIM = flags.DEFINE_integer("dim", 256, "Model width.")
_DEPTH = flags.DEFINE_integer("depth", 6, "Blocks.")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Image side (patch size 4).")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed steps (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/functional_overhead.json", "JSON output path.")

NNX_SITES = r"blocks/\d+/(attn/(query|key|value|out)|mlp/(up|down))"
LINEN_SITES = r"params/blocks_\d+/(attn/(query|key|value|out)|mlp/(up|down))"


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def nnx_step(model, spec, tx):
  lrj.attach(model, [(NNX_SITES, spec)], rngs=nnx.Rngs(1))
  graphdef, adapter_state, rest = nnx.split(model, lrj.AdapterParam, ...)

  @jax.jit
  def step(adapter_state, opt_state, rest, images, labels):
    def loss_fn(adapter_state):
      return _loss(nnx.merge(graphdef, adapter_state, rest)(images), labels)
    loss, grads = jax.value_and_grad(loss_fn)(adapter_state)
    updates, opt_state = tx.update(grads, opt_state, adapter_state)
    return optax.apply_updates(adapter_state, updates), opt_state, loss

  return step, adapter_state, rest


def functional_step(config, variables, spec, tx):
  model = vit_linen.ViT(config)
  adapted, adapter_params = lrj.functional.adapt(model.apply, variables, [(LINEN_SITES, spec)],
                                                 key=jax.random.key(1))

  @jax.jit
  def step(adapter_params, opt_state, variables, images, labels):
    loss_fn = lambda ap: _loss(adapted(ap, variables, images), labels)
    loss, grads = jax.value_and_grad(loss_fn)(adapter_params)
    updates, opt_state = tx.update(grads, opt_state, adapter_params)
    return optax.apply_updates(adapter_params, updates), opt_state, loss

  return step, adapter_params


def op_counts(step, *args) -> dict[str, int]:
  """Number of dot / convolution / fusion ops in the compiled step (a timing-free check)."""
  text = step.lower(*args).compile().as_text()
  return {op: len(re.findall(rf" {op}\(", text)) for op in ("dot", "convolution", "fusion")}


def main(argv):
  del argv
  if _QUICK.value:
    dim, depth, image, batch, rank, repeats = 32, 1, 8, 8, 2, 3
  else:
    dim, depth, image, batch, rank, repeats = (_DIM.value, _DEPTH.value, _IMAGE.value,
                                               _BATCH.value, _RANK.value, _REPEATS.value)
  config = vit.ViTConfig(image_size=image, patch_size=4 if image % 4 == 0 else 2, channels=3,
                         dim=dim, depth=depth, heads=4, mlp_dim=4 * dim)
  model = vit.ViT(config, rngs=nnx.Rngs(0))
  variables = vit_linen.variables_from_nnx(model)
  images = jax.random.normal(jax.random.key(2), (batch, image, image, 3), jnp.float32)
  labels = jax.random.randint(jax.random.key(3), (batch,), 0, config.num_classes)
  spec = lrj.adapters.lora(rank=rank, alpha=2.0 * rank)
  tx = optax.adam(1e-3)

  f_step, f_params = functional_step(config, variables, spec, tx)
  n_step, n_state, n_rest = nnx_step(model, spec, tx)
  f_opt, n_opt = tx.init(f_params), tx.init(n_state)
  # Same starting point and the same first loss on both front ends.
  _, _, f_loss = f_step(f_params, f_opt, variables, images, labels)
  _, _, n_loss = n_step(n_state, n_opt, n_rest, images, labels)
  nnx_s, functional_s = median_seconds(
      [(n_step, (n_state, n_opt, n_rest, images, labels)),
       (f_step, (f_params, f_opt, variables, images, labels))], repeats)
  ratio = functional_s / nnx_s
  nnx_ops = op_counts(n_step, n_state, n_opt, n_rest, images, labels)
  functional_ops = op_counts(f_step, f_params, f_opt, variables, images, labels)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), ViT dim={dim} "
        f"depth={depth} image={image} batch={batch}, LoRA r={rank} on attention and MLP, "
        f"median of {repeats}")
  print(f"{'front end':<12}{'step ms':>10}{'first loss':>12}")
  print(f"{'nnx attach':<12}{1e3 * nnx_s:>10.2f}{float(n_loss):>12.5f}")
  print(f"{'functional':<12}{1e3 * functional_s:>10.2f}{float(f_loss):>12.5f}")
  print(f"ratio functional / nnx: {ratio:.3f} (target <= 1.05)")
  print(f"compiled ops, nnx: {nnx_ops}, functional: {functional_ops}")
  result = dict(device=str(jax.devices()[0]), backend=jax.default_backend(),
                machine=platform.machine(), cpus=os.cpu_count(), quick=_QUICK.value, dim=dim,
                depth=depth, image_size=image, batch=batch, rank=rank, repeats=repeats,
                nnx_s=nnx_s, functional_s=functional_s, ratio=ratio, nnx_ops=nnx_ops,
                functional_ops=functional_ops,
                nnx_first_loss=float(n_loss), functional_first_loss=float(f_loss))
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

"""Tasks: what a config trains (model, batches, loss), registered by name.

A `Task` bundles four functions of the config:

* ``build_model(config, rngs)`` -> the NNX model, before adapters;
* ``train_batches(config, start_step)`` -> an iterator of batches, the same
  batches for the same seed whatever ``start_step`` (resume skips exactly);
* ``eval_batches(config)`` -> a fixed list of validation batches;
* ``loss(model, batch)`` -> (scalar loss, dict of scalar metrics).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import data
from lowrank_jax.models import bert
from lowrank_jax.models import gpt
from lowrank_jax.models import mlp
from lowrank_jax.models import structured_init
from lowrank_jax.models import vit

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  build_model: Callable[[Any, nnx.Rngs], nnx.Module]
  train_batches: Callable[[Any, int], Iterator[Batch]]
  eval_batches: Callable[[Any], list[Batch]]
  loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


_TASKS: dict[str, Task] = {}


def register(name: str, task: Task) -> None:
  _TASKS[name] = task


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(_TASKS)}.")
  return _TASKS[name]


def names() -> list[str]:
  return sorted(_TASKS)


def indexed_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                    start_step: int) -> Iterator[Batch]:
  """Random batches of rows; the batch of step t depends only on (seed, t)."""
  n = len(next(iter(arrays.values())))
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
  step = start_step
  while True:
    rows = np.random.default_rng([seed, step]).choice(n, batch_size, replace=False)
    yield {k: v[rows] for k, v in arrays.items()}
    step += 1


# -- teacher-student regression ---------------------------------------------------
def _teacher_student_model(config) -> mlp.MLP:
  m = config.model
  return mlp.MLP((m.d_in, m.d_hidden, m.d_hidden, m.d_out), rngs=nnx.Rngs(m.base_seed))


def _teacher_data(config, split: str) -> dict[str, np.ndarray]:
  """Inputs and outputs of the base MLP whose middle layer ('layers/1') has the target W*."""
  m, d = config.model, config.data
  teacher = _teacher_student_model(config)
  rng = np.random.default_rng(d.task_seed)
  w0 = np.asarray(teacher.layers[1].kernel[...])
  teacher.layers[1].kernel[...] = data.teacher_update(rng, w0, d.kind, rank=d.update_rank,
                                                      scale=d.update_scale)
  n = d.n_train if split == "train" else d.n_val
  x = np.random.default_rng([d.task_seed, 0 if split == "train" else 1]).standard_normal(
      (n, m.d_in)).astype(np.float32)
  return {"x": x, "y": np.asarray(teacher(x))}


def _mse(model, batch):
  loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
  return loss, {}


register("teacher_student", Task(
    build_model=lambda config, rngs: _teacher_student_model(config),
    train_batches=lambda config, start: indexed_batches(
        _teacher_data(config, "train"), config.batch_size, config.seed, start),
    eval_batches=lambda config: [_teacher_data(config, "validation")],
    loss=_mse,
))


# -- per-layer-rank regression (GoRA's synthetic task) ------------------------------------
def _layer_ranks_model(config) -> mlp.MLP:
  m = config.model
  return mlp.MLP((m.d_in,) + (m.d_hidden,) * (len(config.data.update_ranks) - 1) + (m.d_out,),
                 rngs=nnx.Rngs(m.base_seed))


def _layer_ranks_data(config, split: str) -> dict[str, np.ndarray]:
  """Outputs of the base MLP whose layer l has a rank-``update_ranks[l]`` update (0: none)."""
  m, d = config.model, config.data
  teacher = _layer_ranks_model(config)
  rng = np.random.default_rng(d.task_seed)
  for layer, rank in zip(teacher.layers, d.update_ranks):
    if rank:
      layer.kernel[...] = data.teacher_update(rng, np.asarray(layer.kernel[...]), "low_rank",
                                              rank=rank, scale=d.update_scale)
  n = d.n_train if split == "train" else d.n_val
  x = np.random.default_rng([d.task_seed, 0 if split == "train" else 1]).standard_normal(
      (n, m.d_in)).astype(np.float32)
  return {"x": x, "y": np.asarray(teacher(x))}


register("layer_ranks", Task(
    build_model=lambda config, rngs: _layer_ranks_model(config),
    train_batches=lambda config, start: indexed_batches(
        _layer_ranks_data(config, "train"), config.batch_size, config.seed, start),
    eval_batches=lambda config: [_layer_ranks_data(config, "validation")],
    loss=_mse,
))


# -- byte-level language modeling ---------------------------------------------------
def _lm_loss(model, batch):
  loss = gpt.next_token_loss(model(batch["tokens"]), batch["tokens"])
  return loss, {"bits_per_byte": loss / np.log(2.0)}


def _lm_eval(config):
  d = config.data
  corpus = data.load_text(d.domain, "validation", d.val_fraction)
  return data.lm_eval_batches(corpus, d.eval_batch_size, d.seq_len, d.eval_batches)


register("lm", Task(
    build_model=lambda config, rngs: gpt.GPT(gpt.GPTConfig(**config.model.to_dict()), rngs=rngs),
    train_batches=lambda config, start: data.lm_batches(
        data.load_text(config.data.domain, "train", config.data.val_fraction), config.batch_size,
        config.data.seq_len, config.seed, start),
    eval_batches=_lm_eval,
    loss=_lm_loss,
))


# -- ViT on scikit-learn digits -------------------------------------------------------
def _classification_loss(model, batch):
  logits = model(batch["images"]).astype(jnp.float32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}


def _digits(config, split):
  images, labels = data.digits(split, config.data.val_fraction, config.data.split_seed)
  if split == "train" and config.data.train_examples:
    images, labels = images[:config.data.train_examples], labels[:config.data.train_examples]
  return {"images": images, "labels": labels}


def _vit(config, rngs) -> vit.ViT:
  """The ViT of the config; ``structured_init=True`` fits its heads to shift maps."""
  model = vit.ViT(vit.ViTConfig(**config.model.to_dict()), rngs=rngs)
  if config.get("structured_init"):
    structured_init.init_vit(model, key=jax.random.key(config.seed))
  return model


register("vit_digits", Task(
    build_model=_vit,
    train_batches=lambda config, start: indexed_batches(
        _digits(config, "train"), config.batch_size, config.seed, start),
    eval_batches=lambda config: [_digits(config, "validation")],
    loss=_classification_loss,
))


# -- MiniLM topic classification ------------------------------------------------------
class SentenceClassifier(nnx.Module):
  """A pretrained BERT encoder at ``bert``, mean pooling, and a linear ``head``."""

  def __init__(self, encoder: bert.BertModel, num_classes: int, *, rngs: nnx.Rngs):
    self.bert = encoder
    self.head = nnx.Linear(encoder.config.hidden_size, num_classes, rngs=rngs)

  def __call__(self, input_ids, attention_mask):
    hidden = self.bert(input_ids, attention_mask)
    return self.head(bert.mean_pool(hidden, attention_mask))


@functools.lru_cache(maxsize=2)
def _pretrained_bert(path: str):
  return bert.from_pretrained(path)


@functools.lru_cache(maxsize=4)
def _topic_arrays(path: str, split: str, max_topics: int, seq_len: int, val_fraction: float):
  texts, labels, _ = data.topic_classification(split, val_fraction=val_fraction,
                                               max_topics=max_topics)
  tokenizer = _pretrained_bert(path)[1]
  tokenizer.enable_truncation(seq_len)
  tokenizer.enable_padding(length=seq_len)
  encoded = tokenizer.encode_batch(texts)
  return {"input_ids": np.array([e.ids for e in encoded], np.int32),
          "attention_mask": np.array([e.attention_mask for e in encoded], np.int32),
          "labels": labels.astype(np.int32)}


def _topics(config, split):
  d = config.data
  return _topic_arrays(d.checkpoint, split, d.max_topics, d.seq_len, d.val_fraction)


def _build_classifier(config, rngs):
  encoder, _ = bert.from_pretrained(config.data.checkpoint)
  return SentenceClassifier(encoder, config.data.max_topics, rngs=rngs)


def _topic_loss(model, batch):
  logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}


register("minilm_topics", Task(
    build_model=_build_classifier,
    train_batches=lambda config, start: indexed_batches(
        _topics(config, "train"), config.batch_size, config.seed, start),
    eval_batches=lambda config: [_topics(config, "validation")],
    loss=_topic_loss,
))

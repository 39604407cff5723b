"""Data that needs no network: embedded text, labeled paragraphs, digits, synthetic tasks.

* English text: the topics of Python's own ``pydoc_data.topics`` (help() pages).
* Python code: the Python standard library's own top-level ``.py`` sources.
* Topic classification: paragraphs of the pydoc topics labeled by their topic.
* Images: scikit-learn's digits (8x8 grayscale, 1797 images).
* Teacher-student: weight updates of a chosen structure on a frozen base.
* Local files: a ``.txt`` (bytes) or ``.npz`` (arrays) a user points to.

Text is tokenized as bytes (vocabulary 256). Splits are deterministic: the last
``val_fraction`` of a corpus (or of a seeded permutation of examples) is the
validation split. Batch iterators depend only on (seed, step), so a resumed run
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Iterator

import numpy as np

DOMAINS = ("english", "python")


def _english_text() -> str:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return "\n\n".join(topics.topics[name].strip() for name in sorted(topics.topics))


def _python_text(max_bytes: int = 4_000_000) -> str:
  stdlib = os.path.dirname(os.__file__)
  parts, size = [], 0
  for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    parts.append(text)
    size += len(text)
    if size >= max_bytes:
      break
  return "\n\n".join(parts)


def load_text(domain: str = "english", split: str = "train", val_fraction: float = 0.1) -> np.ndarray:
  """The bytes (uint8) of an embedded corpus split.

  Args:
    domain: 'english' (pydoc topics) or 'python' (standard library sources).
    split: 'train' or 'validation' (the last ``val_fraction`` of the corpus).
    val_fraction: in (0, 1).
  """
  if domain not in DOMAINS:
    raise ValueError(f"Unknown text domain {domain!r}; known: {DOMAINS}.")
  _check_split(split, val_fraction)
  text = _english_text() if domain == "english" else _python_text()
  data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
  cut = int(len(data) * (1.0 - val_fraction))
  return data[:cut] if split == "train" else data[cut:]


def _check_split(split: str, val_fraction: float) -> None:
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")


def lm_batches(data: np.ndarray, batch_size: int, seq_len: int, seed: int,
               start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Random windows of ``seq_len + 1`` tokens; the batch of step t depends on (seed, t) only."""
  if len(data) <= seq_len + 1:
    raise ValueError(f"The corpus has {len(data)} tokens, too few for seq_len={seq_len}.")
  step = start_step
  while True:
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - seq_len - 1, batch_size)
    yield {"tokens": np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)}
    step += 1


def lm_eval_batches(data: np.ndarray, batch_size: int, seq_len: int,
                    num_batches: int) -> list[dict[str, np.ndarray]]:
  """Fixed, evenly spaced validation windows."""
  count = batch_size * num_batches
  starts = np.linspace(0, len(data) - seq_len - 2, count).astype(np.int64)
  windows = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return [{"tokens": w} for w in windows.reshape(num_batches, batch_size, seq_len + 1)]


def topic_classification(split: str = "train", val_fraction: float = 0.2, seed: int = 0,
                         min_chars: int = 200, max_topics: int | None = None):
  """Paragraphs of the pydoc topics labeled by topic.

  Returns:
    (texts, labels, label_names): the distinct paragraphs of at least
    ``min_chars`` characters (a paragraph shared by several topics keeps its
    first topic), int labels, and the topic name of each label. The split is a
    seeded permutation of the paragraphs, stratified by nothing.
  """
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  _check_split(split, val_fraction)
  names = sorted(topics.topics)
  texts, labels, seen = [], [], set()
  for label, name in enumerate(names):
    for paragraph in re.split(r"\n\s*\n", topics.topics[name]):
      paragraph = " ".join(paragraph.split())
      if len(paragraph) >= min_chars and paragraph not in seen:  # some topics share paragraphs
        seen.add(paragraph)
        texts.append(paragraph)
        labels.append(label)
  labels = np.asarray(labels)
  keep_labels = np.unique(labels)
  if max_topics is not None:  # the topics with the most paragraphs
    counts = np.bincount(labels, minlength=len(names))
    keep_labels = np.sort(np.argsort(-counts, kind="stable")[:max_topics])
  keep = np.isin(labels, keep_labels)
  texts = [t for t, k in zip(texts, keep) if k]
  remap = {old: new for new, old in enumerate(keep_labels)}
  labels = np.asarray([remap[l] for l in labels[keep]])
  order = np.random.default_rng(seed).permutation(len(texts))
  cut = int(len(texts) * (1.0 - val_fraction))
  chosen = order[:cut] if split == "train" else order[cut:]
  return [texts[i] for i in chosen], labels[chosen], [names[l] for l in keep_labels]


def digits(split: str = "train", val_fraction: float = 0.2, seed: int = 0):
  """scikit-learn's digits: images (n, 8, 8, 1) float32 in [0, 1] and int32 labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  _check_split(split, val_fraction)
  bunch = load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  order = np.random.default_rng(seed).permutation(len(images))
  cut = int(len(images) * (1.0 - val_fraction))
  chosen = order[:cut] if split == "train" else order[cut:]
  return images[chosen], bunch.target[chosen].astype(np.int32)


TEACHER_KINDS = ("low_rank", "full_rank", "orthogonal", "sparse", "frequency_sparse")


def teacher_update(rng: np.random.Generator, w0: np.ndarray, kind: str, *, rank: int = 4,
                   scale: float = 1.0, density: float = 0.05) -> np.ndarray:
  """A target weight ``W* = W0 + dW`` whose update has a chosen structure.

  Args:
    rng: numpy generator.
    w0: (fan_in, fan_out) base weight.
    kind: 'low_rank' (dW of rank ``rank``), 'full_rank' (dense Gaussian dW),
      'orthogonal' (W* = R W0 with a random rotation R of the input space),
      'sparse' (``density`` of the entries changed), 'frequency_sparse' (dW with
      ``rank`` nonzero 2-D DCT-II coefficients).
    scale: ||dW||_F / ||W0||_F for the additive kinds.
    density: fraction of nonzero entries for 'sparse', in (0, 1].

  Returns:
    The target weight W*, float32.
  """
  fan_in, fan_out = w0.shape
  if kind == "orthogonal":
    rotation, _ = np.linalg.qr(rng.standard_normal((fan_in, fan_in)))
    return (rotation @ w0).astype(np.float32)
  if kind == "low_rank":
    if not 1 <= rank <= min(fan_in, fan_out):
      raise ValueError(f"rank must be in [1, {min(fan_in, fan_out)}], got {rank}.")
    update = rng.standard_normal((fan_in, rank)) @ rng.standard_normal((rank, fan_out))
  elif kind == "full_rank":
    update = rng.standard_normal((fan_in, fan_out))
  elif kind == "sparse":
    if not 0.0 < density <= 1.0:
      raise ValueError(f"density must be in (0, 1], got {density}.")
    update = rng.standard_normal((fan_in, fan_out)) * (rng.random((fan_in, fan_out)) < density)
  elif kind == "frequency_sparse":
    coefficients = np.zeros((fan_in, fan_out))
    rows = rng.integers(0, max(fan_in // 4, 1), rank)
    cols = rng.integers(0, max(fan_out // 4, 1), rank)
    coefficients[rows, cols] = rng.standard_normal(rank)
    update = _dct(fan_in).T @ coefficients @ _dct(fan_out)
  else:
    raise ValueError(f"Unknown teacher kind {kind!r}; known: {TEACHER_KINDS}.")
  update *= scale * np.linalg.norm(w0) / max(np.linalg.norm(update), 1e-12)
  return (w0 + update).astype(np.float32)


def _dct(n: int) -> np.ndarray:
  k, j = np.arange(n)[:, None], np.arange(n)[None, :]
  d = np.cos(np.pi * (2 * j + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d


def load_local(path: str):
  """A local ``.txt`` file as uint8 bytes, or an ``.npz`` file as a dict of arrays."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No such data file: {path}.")
  if path.endswith(".txt"):
    with open(path, "rb") as f:
      return np.frombuffer(f.read(), dtype=np.uint8)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  raise ValueError(f"Unsupported data file {path!r}: expected a .txt or .npz file.")

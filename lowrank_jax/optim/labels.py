"""Parameter labels and masks by path or shape, for ``optax.partition`` and ``optax.masked``.

Paths are the '/'-joined keys of a leaf in the parameter pytree
('blocks/0/attn/query/kernel'), the same strings `lrj.attach` rules match;
NNX ``State`` trees, nested dicts, lists and NamedTuples all give such paths.
An NNX ``Variable`` flattens to its ``value`` attribute; that trailing 'value'
key is dropped, so a parameter has the same path whether the tree holds
Variables (what ``nnx.Optimizer`` passes to ``init``) or plain arrays (the
gradients it passes to ``update``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax
import optax


def key_names(path) -> tuple[str, ...]:
  """String names of a ``jax.tree_util`` key path, a trailing nnx ``.value`` attribute dropped."""
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  return tuple(names)


def path_str(path) -> str:
  """'/'-joined `key_names` of a key path ('blocks/0/attn/query/kernel')."""
  return "/".join(key_names(path))


def leaf_paths(tree) -> list[str]:
  """The '/'-joined paths of the leaves of ``tree``, in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def label_by_path(rules: Sequence[tuple[str, Any]]) -> Callable[[Any], Any]:
  """A function ``params -> labels`` for ``optax.partition``.

  Args:
    rules: ordered ``(regex, label)`` pairs; each leaf path is matched with
      ``re.fullmatch`` and takes the label of the first matching rule.

  Returns:
    A function mapping a parameter pytree to a pytree of labels of the same
    structure.

  Raises (when the function is called):
    ValueError: a leaf no rule matches (its path and the rules are named), or a
      rule that matches no leaf (the leaf paths are listed).
  """
  rules = tuple(rules)
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"label_by_path rules must be (regex, label) pairs, got {rule!r}.")
    re.compile(rule[0])

  def labels(params):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in paths_leaves]
    out = []
    for path in paths:
      for pattern, label in rules:
        if re.fullmatch(pattern, path):
          out.append(label)
          break
      else:
        raise ValueError(f"No label rule matches parameter {path!r}; rules: {[r[0] for r in rules]}.")
    for pattern, _ in rules:
      if not any(re.fullmatch(pattern, p) for p in paths):
        raise ValueError(f"Label rule {pattern!r} matches no parameter; parameter paths: {paths}.")
    return jax.tree_util.tree_unflatten(treedef, out)

  return labels


def mask_by_ndim(min_ndim: int = 2) -> Callable[[Any], Any]:
  """A function ``params -> bool tree`` (for ``optax.masked``): True where ``ndim >= min_ndim``."""
  if not isinstance(min_ndim, int) or min_ndim < 0:
    raise ValueError(f"min_ndim must be an int >= 0, got {min_ndim!r}.")
  return lambda params: jax.tree.map(lambda p: jax.numpy.ndim(p) >= min_ndim, params)


def scaled_learning_rate(learning_rate: float | optax.Schedule, multiplier: float):
  """``multiplier * learning_rate`` for a float or an optax schedule (then a schedule)."""
  if multiplier == 1.0:
    return learning_rate
  if callable(learning_rate):
    return lambda count: multiplier * learning_rate(count)
  return multiplier * learning_rate


def partition_by_multiplier(
    make_tx: Callable[[Any], optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    multiplier_of: Callable[[tuple, Any], float],
    multipliers: Iterable[float],
) -> optax.GradientTransformation:
  """Per-leaf learning-rate multipliers: ``make_tx(multiplier * learning_rate)`` on each leaf.

  An ``optax.partition`` with one inner optimizer per distinct multiplier, so
  each keeps its own state and weight decay scales with its learning rate, as
  in a torch parameter group with ``lr * multiplier``.

  Args:
    make_tx: learning rate (float or schedule) -> optimizer, e.g. ``optax.adamw``.
    learning_rate: the base learning rate, a float or an optax schedule.
    multiplier_of: ``(key path, leaf) -> multiplier`` of every leaf.
    multipliers: every value ``multiplier_of`` can return.

  Raises (at ``init``/``update``): ValueError naming a leaf whose multiplier is not in
  ``multipliers``.
  """
  values = sorted(set(float(m) for m in multipliers))
  label_of = {m: f"lr_x{m!r}" for m in values}

  def labels(params):
    def label(path, leaf):
      m = float(multiplier_of(path, leaf))
      if m not in label_of:
        raise ValueError(f"Parameter {path_str(path)!r} has learning-rate multiplier {m}, not one "
                         f"of the declared {values}.")
      return label_of[m]
    return jax.tree_util.tree_map_with_path(label, params)

  return optax.partition(
      {label_of[m]: make_tx(scaled_learning_rate(learning_rate, m)) for m in values}, labels)

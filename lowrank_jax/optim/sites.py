"""Grouping of parameter-tree leaves by adapter site, for transforms that see a site's factors together.

An adapter site is a module path ('blocks/0/attn/query'); its leaves are the
parameters named ``lora_a``, ``lora_b``, ``stella_u``, ... under it. In an
``nnx.State`` (or any nested dict) a leaf's key path is the site's path, the
leaf's name and, for nnx Variables, a trailing ``value`` attribute:
``('blocks', '0', 'attn', 'query', 'lora_a', 'value')``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax

from lowrank_jax.optim.labels import key_names

PyTree = Any


def leaf_mask(tree: PyTree, names: Iterable[str]) -> PyTree:
  """A pytree of bools like ``tree``: True where the leaf's own name is in ``names``."""
  names = frozenset(names)
  return jax.tree_util.tree_map_with_path(lambda p, _: key_names(p)[-1] in names, tree)


def group(tree: PyTree, names: Iterable[str]) -> dict[str, dict[str, Any]]:
  """``{site: {leaf name: leaf}}`` for the leaves named in ``names`` (others are left out)."""
  names = frozenset(names)
  groups: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = key_names(path)
    if parts[-1] in names:
      groups.setdefault("/".join(parts[:-1]), {})[parts[-1]] = leaf
  return groups


def map_sites(fn: Callable[[str, dict[str, Any]], dict[str, Any]], tree: PyTree,
              names: Iterable[str]) -> PyTree:
  """``tree`` with the leaves of each site replaced by ``fn(site, {name: leaf})``.

  ``fn`` returns a dict with the same names; leaves not named in ``names``
  are kept as they are.
  """
  names = frozenset(names)
  replaced = {site: fn(site, leaves) for site, leaves in group(tree, names).items()}

  def pick(path, leaf):
    parts = key_names(path)
    if parts[-1] not in names:
      return leaf
    return replaced["/".join(parts[:-1])][parts[-1]]

  return jax.tree_util.tree_map_with_path(pick, tree)

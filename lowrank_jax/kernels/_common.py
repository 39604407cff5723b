"""Shared pieces of the kernels: implementation dispatch, input checks, tiling.

Every op in this package takes ``implementation=None|'xla'|'pallas'`` and
``interpret=``:

* ``'xla'``: plain `jax.numpy` contractions, compiled by XLA on any backend.
* ``'pallas'``: the TPU-style ``pl.pallas_call`` kernel (BlockSpecs over a
  grid, a VMEM accumulator). It compiles through Mosaic on TPU; with
  ``interpret=True`` it runs on any backend (CPU tests). On GPU it needs
  ``interpret=True``: asking for it compiled there is an error, never a silent
  fallback.
* ``None``: the dispatcher's choice, ``'pallas'`` on TPU and ``'xla'``
  everywhere else (so the default on CPU and GPU is XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "pallas")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def resolve_implementation(op: str, implementation: str | None, interpret: bool) -> str:
  """'xla' or 'pallas' for ``implementation`` on the default backend.

  Raises:
    ValueError: an unknown implementation, or compiled Pallas on a backend the
      TPU-style kernels do not compile for.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  backend = jax.default_backend()
  if implementation is None:
    return "pallas" if backend == "tpu" else "xla"
  if implementation == "pallas" and backend != "tpu" and not interpret:
    raise ValueError(
        f"{op}: implementation='pallas' compiles the TPU-style (Mosaic TPU) kernel, which does "
        f"not compile on the {backend!r} backend; pass interpret=True to run it in the Pallas "
        "interpreter, or implementation='xla' (or None) for the XLA version.")
  return implementation


def check_dtypes(op: str, **arrays) -> None:
  """Raise unless every named array has a floating dtype the kernels support."""
  allowed = [jnp.dtype(d).name for d in SUPPORTED_DTYPES]
  for name, array in arrays.items():
    if array is not None and jnp.dtype(array.dtype).name not in allowed:
      raise TypeError(f"{op}: {name} has dtype {jnp.dtype(array.dtype).name}; supported: {allowed}.")


def check_matrix(op: str, name: str, array, ndim: int = 2) -> None:
  if array.ndim != ndim:
    raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(array.shape)}.")


def fit_block(dim: int, block: int, align: int, name: str) -> int:
  """The tile length for an axis of size ``dim``: ``block``, or the whole axis when smaller.

  A tile equal to the full axis is always a legal block shape; otherwise the
  requested block must be a positive multiple of ``align`` (the TPU sublane or
  lane width it is laid out along).
  """
  if block <= 0 or block % align:
    raise ValueError(f"BlockSizes.{name}={block} must be a positive multiple of {align}.")
  return dim if dim <= block else block


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pad ``axis`` of ``x`` up to a multiple of ``multiple`` (no copy if it already is).

  Used on contracted axes only: zeros add nothing to a dot product, whereas the
  out-of-bounds part of an edge tile holds undefined values (NaN in the
  interpreter). Edge tiles of output axes need no padding: their out-of-bounds
  part is never written back.
  """
  size = x.shape[axis]
  extra = -size % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def result_dtype(*dtypes) -> jnp.dtype:
  """The output dtype of a contraction of these dtypes (float32 accumulation inside)."""
  return jnp.result_type(*dtypes)

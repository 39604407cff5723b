"""PEFT adapter formats of the methods beyond LoRA: one exporter/importer, a table per method.

Each `PeftMethod` row says, for one of our specs, which PEFT ``peft_type`` it
is, which ``adapter_config.json`` fields it writes (`config`) and reads back
(`spec`), and how each leaf maps to a tensor of PEFT's state dict (`to_torch`,
`from_torch`, in PEFT's (out, in) layout for the module named ``M``:
``base_model.model.M.<suffix>``). Tensors shared by every layer (VeRA's
projections) are stored once as ``base_model.<name>`` (`shared_to_torch`,
`shared_from_torch`), as PEFT saves them.

`export_methods` and `import_methods` are the one mechanism over that table;
`lowrank_jax.io.peft.export_peft` / `import_peft` call them for these methods
(LoRA and DoRA keep their own format code there). Supported layers:
``nnx.Linear`` for every row, and 2-D ``nnx.Conv`` (PEFT's ``nn.Conv2d``) for
LoHa, HRA, AdaLoRA and HUT (`PeftMethod.conv_fan_in_axes`). A spec option PEFT
cannot express, or a model mixing methods or hyperparameters, raises
`PeftFormatError`.

2-D conv: PEFT flattens a filter to (out, in * kh * kw) in (in, kh, kw) order,
our view to (kh * kw * in, out). LoHa's Hadamard product, HRA's reflections,
AdaLoRA's SVD factors and HUT's element-wise modulation commute with a permutation
of the fan_in axis, so those tensors are reordered on export / import and the
mapping is exact (HRA: square windows only, PEFT sizes ``hra_u`` by
``kernel_size[0] ** 2``; HUT: PEFT keeps its factors as 4-D conv weights,
`PeftMethod.conv_shape`). Refused with the
reason (`PeftMethod.no_conv`): LoKr (PEFT keeps the whole window in the second
Kronecker factor, ``lokr_w2`` (out_k, in_n, kh, kw)), OFT and BOFT (PEFT rotates
contiguous blocks of its (in, kh, kw) flattening, ours of (kh, kw, in)), and
``use_effective_conv2d=True`` files (PEFT's CP decomposition of the kernel).
VeRA, FourierFT and MiSS have no Conv2d layer in PEFT.

Layouts (ours (fan_in, fan_out) -> PEFT):

* LoHa: ``hada_w1_a = B1.T``, ``hada_w1_b = A1.T``, ``hada_w2_a = B2.T``,
  ``hada_w2_b = A2.T``.
* LoKr: ``lokr_w1 = C.T`` (or ``lokr_w1_a = C_b.T``, ``lokr_w1_b = C_a.T``),
  ``lokr_w2 = M.T`` (or ``lokr_w2_a = M_b.T``, ``lokr_w2_b = M_a.T``).
* HRA: ``hra_u`` (in, r) = ``hra_u``.
* OFT: ``oft_R.weight`` (k, b(b-1)/2) = ``oft_q`` with PEFT's Neumann series
  (``num_cayley_neumann_terms = cayley_neumann_order + 2``), ``-oft_q`` with
  the exact Cayley transform (PEFT's exact branch is ``cayley(-Q)``).
* MiSS / Bat (PEFT's MISS with ``init_weights`` True or 'mini' / 'bat'):
  ``miss_block`` = ``miss_block`` (r, out or mini_r) / ``bat_blocks``
  (out / r, r, r), the same layout.
* AdaLoRA: ``lora_A = a.T`` (r, in), ``lora_B = b.T`` (out, r), ``lora_E``
  (r, 1) = the diagonal core (pruned values are zeros). PEFT scales by
  ``lora_alpha / (ranknum + 1e-5)``, ours by ``alpha / r``: a relative
  difference of 1e-5 / r. After pruning (`BudgetAllocator`), each adapter's
  ``rank_mask`` is PEFT's ``rank_pattern`` entry ``'<module>.lora_E'``: export
  writes the pattern and only the kept triplets, as PEFT's save trims them
  (``lora_A`` (kept, in), ``lora_E`` (kept, 1), ``lora_B`` (out, kept)); import
  sets ``rank_mask`` and puts the kept triplets in their slots, the pruned
  slots zero. No pattern is written while every mask is one.
* BOFT: ``boft_R`` (m, k, b, b) = the skew matrices of ``-boft_q`` (PEFT uses
  only the skew part ``(R - R^T) / 2`` of its full matrices, so import is
  exact), ``boft_s`` (out, 1) = ``boft_scale``. PEFT without its CUDA
  extension builds m = 1 whatever the config says, so a file with m > 1 loads
  in PEFT only where that extension is available.
* FourierFT: ``fourierft_spectrum`` = the coefficients. PEFT stores no
  locations: it redraws them from ``random_loc_seed`` with torch's generator
  (`peft_fourier_locations`), so import sets our locations to those, and export
  is exact only for layers whose locations are PEFT's (imported ones).
* HUT (PEFT's HIRA, Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank
  Adaptation for Large Language Models", ICLR 2025; the same formula
  ``W0 + W0 * (B A)``): ``hira_A = hut_a.T`` (r, in), ``hira_B = s hut_b.T``
  (out, r). PEFT has no scale, so export folds s = alpha / r into ``hira_B``
  and import builds ``hut(rank=r)`` (alpha = r, s = 1). On a Conv2d layer
  ``hira_A`` (r, in, kh, kw) is the reordered fan_in axis unflattened and
  ``hira_B`` is (out, r, 1, 1). Refused: ``hira_dropout`` > 0 (HUT has no
  dropout) and a ``rank_pattern`` (one spec per model).
* VeRA: ``vera_lambda_d = d``, ``vera_lambda_b = b``; shared ``vera_A`` (r,
  in_max) ``= A[:in_max].T`` and ``vera_B`` (out_max, r) ``= B[:, :out_max].T``
  with in_max / out_max the largest dims of the adapted layers (the shapes PEFT
  allocates on load); ``save_projection=True`` always, so PEFT loads our
  projections instead of regenerating them from ``projection_prng_key``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import numpy as np
from flax import nnx

from lowrank_jax.adapters import layers
from lowrank_jax.adapters.products import LoHaSpec
from lowrank_jax.adapters.products import LoKrSpec
from lowrank_jax import linalg
from lowrank_jax.adapters.adalora import AdaLoRASpec
from lowrank_jax.adapters.highrank import BatSpec
from lowrank_jax.adapters.highrank import HUTSpec
from lowrank_jax.adapters.highrank import MiSSSpec
from lowrank_jax.adapters.orthogonal import BOFTSpec
from lowrank_jax.adapters.orthogonal import HRASpec
from lowrank_jax.adapters.orthogonal import OFTSpec
from lowrank_jax.adapters.products import VeRASpec
from lowrank_jax.adapters.spectral import FourierFTSpec
from lowrank_jax.attach import adapters as adapter_sites
from lowrank_jax.attach import attach
from lowrank_jax.io.peft import _PREFIX
from lowrank_jax.io.peft import PeftFormatError
from lowrank_jax.io.peft import _torch_name
from lowrank_jax.io.peft import check_shapes

_SHARED_PREFIX = "base_model."


def _np(leaf) -> np.ndarray:
  return np.asarray(leaf[...], np.float32)


def _set(leaf, value: np.ndarray) -> None:
  leaf[...] = np.asarray(value).astype(leaf.dtype)


def _refuse_options(config: dict, method: str, zero_options: dict[str, Any]) -> None:
  """Raise for PEFT options (set to a non-default value) that we do not implement."""
  bad = {k: config[k] for k, default in zero_options.items() if config.get(k, default) != default}
  if bad:
    raise PeftFormatError(f"PEFT {method} options {bad} are not supported here (supported: "
                          f"{zero_options}).")


class PeftMethod(NamedTuple):
  """How one of our methods is written in, and read from, PEFT's format.

  Attributes:
    peft_type: PEFT's ``peft_type``.
    spec_types: our `AdapterSpec` subclasses written as this ``peft_type``.
    key_prefix: the start of the method's tensor suffixes (``hada_``).
    config: (spec, {torch module name: adapter}) -> PEFT config fields; raises for options
      PEFT cannot express.
    spec: (PEFT config, shared tensors) -> spec; raises for unsupported options.
    to_torch: adapter -> {suffix: array in PEFT's layout}.
    from_torch: (adapter, {suffix: array}) -> None, sets the leaves.
    shared_to_torch: adapters -> {name: array} stored once, or None.
    shared_from_torch: (an adapter, {name: array}) -> None, or None.
    shared_leaves: names of the adapter attributes that every layer must share.
    export_check: adapter -> None, raises for a layer PEFT would rebuild differently.
    layer_config: ({torch module name: adapter}, PEFT config) -> None, sets the per-layer
      state that PEFT keeps in the config (AdaLoRA's rank_pattern) on built adapters, before
      the tensor shapes are checked and `from_torch` runs.
    conv_fan_in_axes: for a method whose PEFT Conv2d layer works on the kernel flattened to
      (out, in * kh * kw) with math that commutes with a permutation of that axis: {suffix:
      the tensor axis that runs over fan_in}; the exporter / importer reorder it between our
      (kh, kw, in) flattening and PEFT's (in, kh, kw). None: nnx.Linear layers only.
    conv_shape: (suffix, matrix shape, kernel shape (kh, kw, in, out)) -> the shape PEFT
      stores that tensor in on a Conv2d layer, for a method whose Conv2d tensors are not
      matrices (HiRA's ``hira_A`` (r, in, kh, kw)); the exporter reshapes after the reorder,
      the importer flattens every axis after the first before it. None: stored as matrices.
    no_conv: why the method has no exact 2-D conv mapping (when conv_fan_in_axes is None).
  """

  peft_type: str
  spec_types: tuple[type, ...]
  key_prefix: str
  config: Callable[[Any, list], dict]
  spec: Callable[[dict, dict], Any]
  to_torch: Callable[[Any], dict[str, np.ndarray]]
  from_torch: Callable[[Any, dict[str, np.ndarray]], None]
  shared_to_torch: Callable[[list], dict[str, np.ndarray]] | None = None
  shared_from_torch: Callable[[Any, dict[str, np.ndarray]], None] | None = None
  shared_leaves: tuple[str, ...] = ()
  export_check: Callable[[Any], None] | None = None
  layer_config: Callable[[dict[str, Any], dict], None] | None = None
  conv_fan_in_axes: dict[str, int] | None = None
  conv_shape: Callable[[str, tuple[int, ...], tuple[int, ...]], tuple[int, ...]] | None = None
  no_conv: str = "PEFT's layer for it exists for nn.Linear only"


# -- LoHa --------------------------------------------------------------------------
_LYCORIS_OPTIONS = dict(rank_dropout=0.0, module_dropout=0.0, use_effective_conv2d=False,
                        rank_pattern={}, alpha_pattern={}, init_weights=True)
_LOHA_NAMES = {"loha_b1": "hada_w1_a", "loha_a1": "hada_w1_b", "loha_b2": "hada_w2_a",
               "loha_a2": "hada_w2_b"}


def _lycoris_alpha(spec) -> float:
  return float(spec.rank if spec.alpha is None else spec.alpha)


def _refuse_effective_conv(config, method: str) -> None:
  if config.get("use_effective_conv2d"):
    raise PeftFormatError(
        f"PEFT {method} use_effective_conv2d=True (a CP decomposition of the conv kernel, with "
        "core tensors over the kernel window) has no equivalent here: our adapters factor the "
        "flattened (kh * kw * in, out) matrix. Save the PEFT adapter with use_effective_conv2d=False.")


def _loha_spec(config, shared):
  del shared
  _refuse_effective_conv(config, "LOHA")
  _refuse_options(config, "LOHA", _LYCORIS_OPTIONS)
  return LoHaSpec(rank=int(config["r"]), alpha=float(config["alpha"]))


# -- LoKr --------------------------------------------------------------------------
_LOKR_NAMES = {"lokr_c": "lokr_w1", "lokr_c_a": "lokr_w1_b", "lokr_c_b": "lokr_w1_a",
               "lokr_m": "lokr_w2", "lokr_m_a": "lokr_w2_b", "lokr_m_b": "lokr_w2_a"}


def _lokr_config(spec, adapters):
  del adapters
  if spec.kron_shape is not None:
    raise PeftFormatError(f"lokr kron_shape={spec.kron_shape} has no PEFT equivalent (PEFT derives "
                          "the Kronecker shape from decompose_factor); use decompose_factor.")
  return dict(r=spec.rank, alpha=_lycoris_alpha(spec), decompose_both=spec.decompose_both,
              decompose_factor=spec.decompose_factor, rank_dropout_scale=False, exclude_modules=None,
              **_LYCORIS_OPTIONS)


def _lokr_spec(config, shared):
  del shared
  _refuse_effective_conv(config, "LOKR")
  _refuse_options(config, "LOKR", dict(_LYCORIS_OPTIONS, rank_dropout_scale=False))
  return LoKrSpec(rank=int(config["r"]), alpha=float(config["alpha"]),
                  decompose_both=bool(config.get("decompose_both", False)),
                  decompose_factor=int(config.get("decompose_factor", -1)))


def _transposed_to_torch(names: dict[str, str]):
  def to_torch(adapter):
    return {peft: _np(getattr(adapter, ours)).T for ours, peft in names.items()
            if hasattr(adapter, ours)}
  return to_torch


def _transposed_from_torch(names: dict[str, str]):
  def from_torch(adapter, fields):
    for ours, peft in names.items():
      if hasattr(adapter, ours):
        _set(getattr(adapter, ours), fields[peft].T)
  return from_torch


# -- VeRA --------------------------------------------------------------------------
def _vera_config(spec, adapters):
  del adapters
  return dict(r=spec.rank, d_initial=spec.d_initial, projection_prng_key=spec.projection_seed,
              save_projection=True, vera_dropout=spec.dropout, fan_in_fan_out=False, bias="none",
              init_weights=True)


def _vera_spec(config, shared):
  if not config.get("save_projection", True):
    raise PeftFormatError("PEFT VeRA adapter saved with save_projection=False: its projections "
                          "come from torch's generator and are not in the file; save it with "
                          "save_projection=True.")
  _refuse_options(config, "VERA", dict(fan_in_fan_out=False, bias="none"))
  for name in ("vera_A", "vera_B"):
    if name not in shared:
      raise PeftFormatError(f"The adapter file lacks the shared projection '{_SHARED_PREFIX}{name}'.")
  rank = int(config["r"])
  return VeRASpec(rank=rank, d_initial=float(config.get("d_initial", 0.1)),
                  projection_seed=int(config.get("projection_prng_key", 0)),
                  dropout=float(config.get("vera_dropout") or 0.0),
                  basis_shape=(shared["vera_A"].shape[1], shared["vera_B"].shape[0]))


def _vera_shared_to_torch(adapters):
  in_max = max(a.view.fan_in for a in adapters)
  out_max = max(a.view.fan_out for a in adapters)
  first = adapters[0]
  return {"vera_A": _np(first.vera_a)[:in_max].T, "vera_B": _np(first.vera_bmat)[:, :out_max].T}


def _vera_shared_from_torch(adapter, shared):
  _set(adapter.vera_a, shared["vera_A"].T)
  _set(adapter.vera_bmat, shared["vera_B"].T)


# -- FourierFT ---------------------------------------------------------------------
def peft_fourier_locations(fan_in: int, fan_out: int, n: int, seed: int) -> tuple[int, ...]:
  """PEFT's FourierFT locations as flat indices of our (fan_in, fan_out) layout.

  PEFT draws ``torch.randperm(out * in, generator=manual_seed(seed))[:n]`` as
  flat indices ``o * in + i`` of its (out, in) weight; ours are ``i * out + o``.
  """
  import torch  # pylint: disable=g-import-not-at-top

  flat = torch.randperm(fan_out * fan_in, generator=torch.Generator().manual_seed(seed))[:n].numpy()
  return tuple(int(v) for v in (flat % fan_in) * fan_out + flat // fan_in)


def _fourierft_check(adapter):
  spec, view = adapter.spec, adapter.view
  if spec.seed is None or tuple(adapter.locations) != peft_fourier_locations(
      view.fan_in, view.fan_out, spec.n_frequency, spec.seed):
    raise PeftFormatError(
        f"FourierFT layer '{adapter.path}': PEFT does not store the frequency locations but redraws "
        "them with torch.randperm from random_loc_seed, and this layer's locations are not those "
        f"(seed={spec.seed}). Adapters imported from PEFT (import_peft) keep PEFT's locations and "
        "export exactly; otherwise pass approximate_rank=r to export the closest LoRA.")


def _fourierft_spec(config, shared):
  del shared
  _refuse_options(config, "FOURIERFT", dict(n_frequency_pattern={}, fan_in_fan_out=False,
                                            bias="none"))
  return FourierFTSpec(n_frequency=int(config["n_frequency"]), scale=float(config["scaling"]),
                       seed=int(config["random_loc_seed"]))


def _fourierft_from_torch(adapter, fields):
  view = adapter.view
  adapter.locations = peft_fourier_locations(view.fan_in, view.fan_out, adapter.spec.n_frequency,
                                             adapter.spec.seed)
  _set(adapter.coefficients, fields["fourierft_spectrum"])


# -- OFT ---------------------------------------------------------------------------
def _block_layout(spec, adapters, method: str) -> tuple[int, int]:
  """(number of blocks, block size) for the config, one of them 0 as PEFT wants."""
  sizes = {a.block_size for a in adapters.values()}
  counts = {a.num_blocks for a in adapters.values()}
  if spec.num_blocks is not None or (len(sizes) > 1 and len(counts) == 1):
    return counts.pop(), 0
  if len(sizes) == 1:
    return 0, sizes.pop()
  raise PeftFormatError(f"PEFT's {method} config holds one block size or one number of blocks "
                        f"for every layer; the layers use block sizes {sorted(sizes)} and block "
                        f"counts {sorted(counts)}. Set block_size or num_blocks on the spec.")


def _oft_config(spec, adapters):
  r, block_size = _block_layout(spec, adapters, "OFT")
  order = spec.cayley_neumann_order
  return dict(r=r, oft_block_size=block_size, block_share=spec.block_share,
              use_cayley_neumann=order > 0, num_cayley_neumann_terms=order + 2 if order else 5,
              coft=False, eps=6e-5, module_dropout=0.0, fan_in_fan_out=False, bias="none",
              init_weights=True, exclude_modules=None)


def _oft_spec(config, shared):
  del shared
  _refuse_options(config, "OFT", dict(coft=False, module_dropout=0.0, fan_in_fan_out=False,
                                      bias="none"))
  neumann = bool(config.get("use_cayley_neumann", True))
  terms = int(config.get("num_cayley_neumann_terms", 5))
  if neumann and terms < 3:
    raise PeftFormatError(f"PEFT OFT num_cayley_neumann_terms={terms} is not supported here (>= 3).")
  r, block_size = int(config.get("r", 0)), int(config.get("oft_block_size", 0))
  return OFTSpec(block_size=block_size or None, num_blocks=None if block_size else r,
                 block_share=bool(config.get("block_share", False)),
                 cayley_neumann_order=terms - 2 if neumann else 0)


def _oft_sign(adapter) -> float:
  """PEFT's exact Cayley branch is cayley(-Q); its Neumann branch has our sign."""
  return 1.0 if adapter.spec.cayley_neumann_order else -1.0


# -- BOFT --------------------------------------------------------------------------
def _boft_config(spec, adapters):
  if spec.cayley_neumann_order:
    raise PeftFormatError(f"boft cayley_neumann_order={spec.cayley_neumann_order} has no PEFT "
                          "equivalent (PEFT's BOFT uses the exact Cayley transform).")
  num_blocks, block_size = _block_layout(spec, adapters, "BOFT")
  return dict(boft_block_size=block_size, boft_block_num=num_blocks,
              boft_n_butterfly_factor=spec.butterfly_factors, boft_dropout=0.0,
              fan_in_fan_out=False, bias="none", init_weights=True, exclude_modules=None)


def _boft_spec(config, shared):
  del shared
  _refuse_options(config, "BOFT", dict(boft_dropout=0.0, fan_in_fan_out=False, bias="none"))
  num_blocks, block_size = int(config.get("boft_block_num", 0)), int(config.get("boft_block_size", 0))
  return BOFTSpec(butterfly_factors=int(config.get("boft_n_butterfly_factor", 1)),
                  block_size=block_size or None, num_blocks=None if block_size else num_blocks)


def _boft_to_torch(adapter):
  q = _np(adapter.boft_q)
  skew = np.asarray(linalg.skew_from_vector(-q, adapter.block_size), np.float32)
  return {"boft_R": skew, "boft_s": _np(adapter.boft_scale)[:, None]}


def _boft_from_torch(adapter, fields):
  r = fields["boft_R"].astype(np.float32)
  _set(adapter.boft_q, -np.asarray(linalg.skew_to_vector(0.5 * (r - np.swapaxes(r, -1, -2)))))
  _set(adapter.boft_scale, fields["boft_s"][:, 0])


# -- MiSS / Bat (PEFT's MISS tuner, init_weights True / 'mini' / 'bat') ------------------
def _uniform_rows(adapters, leaf: str, axis: int) -> int:
  sizes = {getattr(a, leaf).shape[axis] for a in adapters.values()}
  if len(sizes) > 1:
    raise PeftFormatError(f"PEFT's MISS config holds one r for every layer; the layers use "
                          f"{sorted(sizes)}. Set rank on the spec.")
  return sizes.pop()


def _miss_config(spec, adapters):
  common = dict(miss_dropout=0.0, bias="none", exclude_modules=None)
  if isinstance(spec, BatSpec):
    return dict(r=_uniform_rows(adapters, "bat_blocks", 1), init_weights="bat", mini_r=1, **common)
  r = _uniform_rows(adapters, "miss_block", 0)
  if spec.mini_r is None:
    return dict(r=r, init_weights=True, mini_r=1, **common)
  return dict(r=r, init_weights="mini", mini_r=spec.mini_r, **common)


def _miss_spec(config, shared):
  del shared
  _refuse_options(config, "MISS", dict(miss_dropout=0.0, bias="none"))
  init, r = config.get("init_weights", True), int(config["r"])
  if init == "bat":
    return BatSpec(rank=r)
  if init == "mini":
    return MiSSSpec(rank=r, mini_r=int(config["mini_r"]))
  if init is True:
    return MiSSSpec(rank=r)
  raise PeftFormatError(f"PEFT MISS init_weights={init!r} is not supported here (True, 'mini', 'bat').")


def _miss_leaf(adapter):
  return adapter.bat_blocks if isinstance(adapter.spec, BatSpec) else adapter.miss_block


# -- AdaLoRA -----------------------------------------------------------------------
_ADALORA_FREE = ("rank", "alpha", "init", "factor_std", "param_dtype")  # the rest: our defaults


def _adalora_config(spec, adapters):
  default = AdaLoRASpec()
  changed = [f.name for f in dataclasses.fields(spec) if f.name not in _ADALORA_FREE
             and getattr(spec, f.name) != getattr(default, f.name)]
  if changed or spec.rank is None:
    raise PeftFormatError(f"adalora options {changed or ['rank=None']} have no PEFT equivalent "
                          "(PEFT's AdaLoRA is a rank-r SVD-form LoRA with a diagonal core).")
  alpha = float(spec.rank if spec.alpha is None else spec.alpha)
  masks = {name: _np(a.rank_mask) > 0 for name, a in adapters.items()}
  pruned = any(not mask.all() for mask in masks.values())
  rank_pattern = ({f"{name}.lora_E": mask.tolist() for name, mask in masks.items()} if pruned
                  else None)
  return dict(init_r=spec.rank, target_r=spec.rank, r=spec.rank, lora_alpha=alpha, lora_dropout=0.0,
              total_step=1, tinit=0, tfinal=0, deltaT=1, rank_pattern=rank_pattern, bias="none",
              fan_in_fan_out=False, init_lora_weights=True, use_dora=False, use_rslora=False,
              exclude_modules=None)


def _adalora_spec(config, shared):
  del shared
  _refuse_options(config, "ADALORA", dict(lora_dropout=0.0, use_dora=False, use_rslora=False,
                                          bias="none", lora_bias=False))
  spec = AdaLoRASpec(rank=int(config["init_r"]), alpha=float(config["lora_alpha"]))
  for key, mask in (config.get("rank_pattern") or {}).items():
    if not key.endswith(".lora_E") or len(mask) != spec.rank:
      raise PeftFormatError(f"PEFT ADALORA rank_pattern entry {key!r}: expected '<module>.lora_E' "
                            f"with init_r = {spec.rank} booleans, got {len(mask)} values.")
  return spec


def _adalora_kept(adapter) -> np.ndarray:
  return _np(adapter.rank_mask) > 0


def _adalora_to_torch(adapter):
  """PEFT's layout of the kept triplets (its save trims lora_A/E/B to the rank_pattern)."""
  kept = _adalora_kept(adapter)
  return {"lora_A": _np(adapter.a).T[kept], "lora_B": _np(adapter.b).T[:, kept],
          "lora_E": _np(adapter.core)[kept].reshape(-1, 1)}


def _adalora_from_torch(adapter, fields):
  """The kept triplets from the file; the pruned ones are zeros (lambda, and P, Q)."""
  kept = _adalora_kept(adapter)
  a, b, core = np.zeros(adapter.a.shape), np.zeros(adapter.b.shape), np.zeros(adapter.core.shape)
  a[:, kept], b[kept], core[kept] = fields["lora_A"].T, fields["lora_B"].T, fields["lora_E"][:, 0]
  _set(adapter.a, a)
  _set(adapter.b, b)
  _set(adapter.core, core)


def _adalora_layer_config(adapters, config):
  """Our rank_mask from PEFT's rank_pattern (all kept where the pattern has no entry)."""
  patterns = config.get("rank_pattern") or {}
  unknown = sorted(set(patterns) - {f"{name}.lora_E" for name in adapters})
  if unknown:
    raise PeftFormatError(f"PEFT ADALORA rank_pattern names {unknown}, which are not layers of "
                          f"the adapter file ({sorted(adapters)}).")
  for name, adapter in adapters.items():
    if f"{name}.lora_E" in patterns:
      _set(adapter.rank_mask, np.asarray(patterns[f"{name}.lora_E"], bool))


# -- HRA ---------------------------------------------------------------------------
def _hra_check(adapter):
  shape = adapter.view.kernel_shape
  if adapter.view.kind == "conv" and shape[0] != shape[1]:
    raise PeftFormatError(f"HRA layer '{adapter.path}' has a {shape[0]} x {shape[1]} window; PEFT's "
                          "HRA Conv2d sizes hra_u by kernel_size[0] ** 2, so it holds square "
                          "windows only.")


def _hra_spec(config, shared):
  del shared
  _refuse_options(config, "HRA", dict(apply_GS=False, bias="none"))
  return HRASpec(rank=int(config["r"]))


# -- HUT (PEFT's HIRA) -----------------------------------------------------------------
def _hira_spec(config, shared):
  """PEFT's HiRA has no scale: W0 + W0 * (B A) is our HUT at alpha = r (s = 1)."""
  del shared
  _refuse_options(config, "HIRA", dict(hira_dropout=0.0, rank_pattern={}))
  return HUTSpec(rank=int(config["r"]))


def _hira_to_torch(adapter):
  """hira_A = A.T (r, in), hira_B = s B.T (out, r): s = alpha / r folded into hira_B."""
  return {"hira_A": _np(adapter.hut_a).T, "hira_B": adapter.spec.scale * _np(adapter.hut_b).T}


def _hira_from_torch(adapter, fields):
  _set(adapter.hut_a, fields["hira_A"].T)
  _set(adapter.hut_b, fields["hira_B"].T / adapter.spec.scale)


def _hira_conv_shape(suffix, shape, kernel_shape):
  """PEFT's HiRA Conv2d: hira_A (r, in, kh, kw), hira_B (out, r, 1, 1)."""
  kh, kw, cin, _ = kernel_shape
  return (shape[0], cin, kh, kw) if suffix == "hira_A" else (*shape, 1, 1)


_BLOCKS_ON_CONV = ("PEFT's Conv2d layer rotates contiguous blocks of the filter flattened in "
                   "(in, kh, kw) order, ours blocks of the (kh, kw, in) flattening: the "
                   "block-diagonal rotations differ")

METHODS = (
    PeftMethod("LOHA", (LoHaSpec,), "hada_",
               lambda spec, _: dict(r=spec.rank, alpha=_lycoris_alpha(spec), exclude_modules=None,
                                 **_LYCORIS_OPTIONS),
               _loha_spec, _transposed_to_torch(_LOHA_NAMES), _transposed_from_torch(_LOHA_NAMES),
               conv_fan_in_axes={"hada_w1_b": 1, "hada_w2_b": 1}),
    PeftMethod("LOKR", (LoKrSpec,), "lokr_", _lokr_config, _lokr_spec,
               _transposed_to_torch(_LOKR_NAMES), _transposed_from_torch(_LOKR_NAMES),
               no_conv="PEFT's LoKr Conv2d keeps the whole kernel window in the second Kronecker "
               "factor (lokr_w2 (out_k, in_n, kh, kw)) while ours factors the flattened "
               "(kh * kw * in, out) matrix: different parametrizations"),
    PeftMethod("VERA", (VeRASpec,), "vera_", _vera_config, _vera_spec,
               lambda a: {"vera_lambda_d": _np(a.vera_d), "vera_lambda_b": _np(a.vera_b)},
               lambda a, f: (_set(a.vera_d, f["vera_lambda_d"]), _set(a.vera_b, f["vera_lambda_b"])),
               _vera_shared_to_torch, _vera_shared_from_torch, ("vera_a", "vera_bmat")),
    PeftMethod("FOURIERFT", (FourierFTSpec,), "fourierft_",
               lambda spec, _: dict(n_frequency=spec.n_frequency, scaling=spec.scale,
                                 random_loc_seed=spec.seed, n_frequency_pattern={},
                                 fan_in_fan_out=False, bias="none", init_weights=False,
                                 exclude_modules=None),
               _fourierft_spec, lambda a: {"fourierft_spectrum": _np(a.coefficients)},
               _fourierft_from_torch, export_check=_fourierft_check),
    PeftMethod("HRA", (HRASpec,), "hra_",
               lambda spec, _: dict(r=spec.rank, apply_GS=False, init_weights=True, bias="none",
                                 exclude_modules=None),
               _hra_spec, lambda a: {"hra_u": _np(a.hra_u)}, lambda a, f: _set(a.hra_u, f["hra_u"]),
               export_check=_hra_check, conv_fan_in_axes={"hra_u": 0}),
    PeftMethod("OFT", (OFTSpec,), "oft_", _oft_config, _oft_spec,
               lambda a: {"oft_R.weight": _oft_sign(a) * _np(a.oft_q)},
               lambda a, f: _set(a.oft_q, _oft_sign(a) * f["oft_R.weight"]),
               no_conv=_BLOCKS_ON_CONV),
    PeftMethod("MISS", (MiSSSpec, BatSpec), "miss_", _miss_config, _miss_spec,
               lambda a: {"miss_block": _np(_miss_leaf(a))},
               lambda a, f: _set(_miss_leaf(a), f["miss_block"])),
    PeftMethod("ADALORA", (AdaLoRASpec,), "lora_", _adalora_config, _adalora_spec,
               _adalora_to_torch, _adalora_from_torch, layer_config=_adalora_layer_config,
               conv_fan_in_axes={"lora_A": 1}),
    PeftMethod("BOFT", (BOFTSpec,), "boft_", _boft_config, _boft_spec, _boft_to_torch,
               _boft_from_torch, no_conv=_BLOCKS_ON_CONV),
    PeftMethod("HIRA", (HUTSpec,), "hira_",
               lambda spec, _: dict(r=spec.rank, hira_dropout=0.0, fan_in_fan_out=False,
                                 init_weights=True, rank_pattern={}, exclude_modules=None),
               _hira_spec, _hira_to_torch, _hira_from_torch, conv_fan_in_axes={"hira_A": 1},
               conv_shape=_hira_conv_shape),
)
BY_SPEC = {t: m for m in METHODS for t in m.spec_types}
BY_PEFT_TYPE = {m.peft_type: m for m in METHODS}


def _check_layer(path: str, view: layers.LayerView, method: PeftMethod) -> None:
  if view.kind == "linear":
    return
  if view.kind == "conv" and len(view.kernel_shape) == 4:
    if method.conv_fan_in_axes is None:
      raise PeftFormatError(f"Layer '{path}' is a 2-D conv layer (kernel {view.kernel_shape}); the "
                            f"PEFT {method.peft_type} format has no exact conv mapping: "
                            f"{method.no_conv}.")
    return
  supported = "nnx.Linear" + ("" if method.conv_fan_in_axes is None else " and 2-D nnx.Conv")
  raise PeftFormatError(f"Layer '{path}' is a {view.kind} layer (kernel {view.kernel_shape}); the "
                        f"PEFT {method.peft_type} format supports {supported} layers only.")


def _conv_order(view: layers.LayerView, fields: dict[str, np.ndarray], method: PeftMethod,
                to_torch: bool) -> dict[str, np.ndarray]:
  """A conv layer's tensors between our (kh, kw, in) fan_in order and PEFT's (in, kh, kw) (and shapes)."""
  if view.kind != "conv":
    return fields
  kh, kw, cin, _ = view.kernel_shape
  ours_at = np.arange(kh * kw * cin).reshape(kh, kw, cin).transpose(2, 0, 1).reshape(-1)
  order = ours_at if to_torch else np.argsort(ours_at)  # PEFT's entry j is our entry ours_at[j]
  axes = method.conv_fan_in_axes
  moved = {}
  for suffix, value in fields.items():
    if method.conv_shape is not None and not to_torch:
      value = value.reshape(value.shape[0], -1)
    if suffix in axes:
      value = np.take(value, order, axis=axes[suffix])
    if method.conv_shape is not None and to_torch:
      value = value.reshape(method.conv_shape(suffix, value.shape, view.kernel_shape))
    moved[suffix] = value
  return moved


def _torch_fields(adapter, method: PeftMethod) -> dict[str, np.ndarray]:
  """{suffix: tensor} of one adapter, in PEFT's layout and shapes."""
  return _conv_order(adapter.view, method.to_torch(adapter), method, True)


def _without_dtype(spec):
  return dataclasses.replace(spec, param_dtype=None)


def export_methods(sites, *, module_prefix: str, base_model_name_or_path: str | None):
  """(config, tensors) of ``sites`` (all of one method of `METHODS`, one spec)."""
  methods = {type(adapter.spec): path for path, adapter in sites}
  if len(methods) > 1:
    (type_a, path_a), (type_b, path_b) = list(methods.items())[:2]
    raise PeftFormatError(
        f"PEFT stores one method per adapter; the model mixes {type_a.name} ('{path_a}') and "
        f"{type_b.name} ('{path_b}'). Export them separately, or pass approximate_rank=r to write "
        "all of them as LoRA.")
  method = BY_SPEC[type(sites[0][1].spec)]
  specs = {_without_dtype(adapter.spec): path for path, adapter in sites}
  if len(specs) > 1:
    (spec_a, path_a), (spec_b, path_b) = list(specs.items())[:2]
    raise PeftFormatError(f"PEFT stores one {method.peft_type} config per adapter; '{path_a}' has "
                          f"{spec_a} and '{path_b}' has {spec_b}.")
  first_path, first = sites[0]
  for path, adapter in sites:
    for leaf in method.shared_leaves:
      if getattr(adapter, leaf) is not getattr(first, leaf):
        raise PeftFormatError(f"PEFT stores one {leaf} per adapter, shared by every layer; "
                              f"'{path}' and '{first_path}' hold different ones (attached in "
                              "separate calls).")
  tensors = {}
  for path, adapter in sorted(sites, key=lambda site: site[0]):
    _check_layer(path, adapter.view, method)
    if method.export_check is not None:
      method.export_check(adapter)
    name = _torch_name(path, module_prefix)
    for suffix, value in _torch_fields(adapter, method).items():
      tensors[f"{_PREFIX}{name}.{suffix}"] = np.ascontiguousarray(value)
  if method.shared_to_torch is not None:
    for name, value in method.shared_to_torch([adapter for _, adapter in sites]).items():
      tensors[_SHARED_PREFIX + name] = np.ascontiguousarray(value)
  config = dict(peft_type=method.peft_type, task_type=None,
                base_model_name_or_path=base_model_name_or_path,
                target_modules=sorted(_torch_name(p, module_prefix) for p, _ in sites),
                modules_to_save=None, layers_to_transform=None, layers_pattern=None,
                inference_mode=True,
                **method.config(sites[0][1].spec,
                                {_torch_name(p, module_prefix): a for p, a in sites}))
  return config, tensors


def import_methods(config: dict, tensors: dict[str, np.ndarray], model: nnx.Module, *,
                   module_prefix: str, rngs: nnx.Rngs | None) -> nnx.Module:
  """Attach and load the adapters of a PEFT directory of a method in `METHODS`."""
  method = BY_PEFT_TYPE[config["peft_type"]]
  sites: dict[str, dict[str, np.ndarray]] = {}
  shared = {}
  marker = "." + method.key_prefix
  for key, value in tensors.items():
    if key.startswith(_PREFIX):
      name, found, field = key[len(_PREFIX):].partition(marker)
      if not found:
        raise PeftFormatError(f"Tensor {key!r} is not a {method.peft_type} tensor (no {marker!r}).")
      if module_prefix and not name.startswith(module_prefix):
        raise PeftFormatError(f"Tensor {key!r} does not start with the module prefix {module_prefix!r}.")
      sites.setdefault(name[len(module_prefix):].replace(".", "/"), {})[method.key_prefix + field] = value
    elif key.startswith(_SHARED_PREFIX):
      shared[key[len(_SHARED_PREFIX):]] = value
    else:
      raise PeftFormatError(f"Unexpected tensor name {key!r} (expected the prefix {_PREFIX!r}).")
  if not sites:
    raise PeftFormatError(f"The {method.peft_type} adapter file holds no layer tensors.")
  try:
    spec = method.spec(config, shared)
  except PeftFormatError:
    raise
  except (ValueError, KeyError) as e:
    raise PeftFormatError(f"PEFT {method.peft_type} config is not supported here: {e!r}") from None
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
  names = {path: _torch_name(path, module_prefix) for path in sites}
  probes = {}  # throwaway adapters on copies of the layers give the expected tensor shapes
  for path in sorted(sites):
    module = modules.get(path)
    if module is None:
      raise PeftFormatError(f"The adapter targets '{names[path]}', which is not a module of the "
                            f"model (our path '{path}').")
    _check_layer(path, layers.view_of(module, path), method)
    try:
      probes[path] = spec.build(nnx.clone(module), rngs=nnx.Rngs(0), path=path)
    except ValueError as e:
      raise PeftFormatError(f"The {method.peft_type} adapter does not fit layer '{path}': {e}") from None
  if method.layer_config is not None:
    method.layer_config({names[p]: probe for p, probe in probes.items()}, config)
  for path, probe in probes.items():
    expected = {suffix: v.shape for suffix, v in _torch_fields(probe, method).items()}
    check_shapes(expected, sites[path], lambda suffix, p=path: f"{_PREFIX}{names[p]}.{suffix}",
                 f"layer '{path}'")
  if method.shared_to_torch is not None:
    expected = {n: v.shape for n, v in method.shared_to_torch(list(probes.values())).items()}
    check_shapes(expected, shared, lambda n: _SHARED_PREFIX + n, "the adapted layers")
  elif shared:
    raise PeftFormatError(f"Unexpected tensors {sorted(_SHARED_PREFIX + n for n in shared)}.")

  attach(model, [(re.escape(path), spec) for path in sorted(sites)],
         rngs=rngs if rngs is not None else nnx.Rngs(0))
  adapters = dict(adapter_sites(model))
  if method.layer_config is not None:
    method.layer_config({names[p]: adapters[p] for p in sites}, config)
  for path, fields in sites.items():
    adapter = adapters[path]
    method.from_torch(adapter, _conv_order(adapter.view, fields, method, False))
  if method.shared_from_torch is not None:
    method.shared_from_torch(adapters[min(sites)], shared)
  return model


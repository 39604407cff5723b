"""The Hugging Face PEFT adapter format: export and import of LoRA and DoRA adapters.

(The other methods PEFT has, LoHa, LoKr, VeRA, ..., go through the table of
`lowrank_jax.io.peft_methods`; `export_peft` and `import_peft` dispatch there.)

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with, for a target module ``M`` (its dotted
torch name), the tensors ``base_model.model.M.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r), for DoRA ``...lora_magnitude_vector`` (out,)
and with ``lora_bias`` ``...lora_B.bias`` (out,). Our module paths are the
'/'-joined torch names (``encoder/layer/0/attention/self/query``); a torch
``nn.Linear.weight`` is our kernel transposed, so ``lora_A.weight = lora_a.T``
and ``lora_B.weight = lora_b.T``. Conv adapters map to PEFT's Conv2d layout
(``lora_A.weight`` (r, in, kh, kw), ``lora_B.weight`` (out, r, 1, 1)).

Weight-aware inits are exported as PEFT saves them by default: the config keeps
``init_lora_weights`` ('pissa', 'olora', ...), and loading onto the ORIGINAL
base model recomputes the same residual base weight before the trained factors
are loaded (exact for the deterministic inits pissa and olora; the randomized
'pissa_niter_<k>' residual depends on the random sketch). MiLoRA has no PEFT
init and is refused with a clear error.

Methods PEFT's LoRA format cannot hold exactly are exported, on request
(``approximate_rank=r``), as the closest rank-r LoRA of their weight update,
with the approximation error reported.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, NamedTuple

import numpy as np
from flax import nnx

from lowrank_jax.adapters import layers
from lowrank_jax.adapters.dora import DoRASpec
from lowrank_jax.adapters.lora import LoRASpec
from lowrank_jax.attach import adapters as adapter_sites
from lowrank_jax.attach import attach

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
APPROXIMATION_NAME = "approximation.json"
_PREFIX = "base_model.model."
# Our init names -> PEFT's init_lora_weights values.
# MiLoRA has no PEFT init, so PEFT could not rebuild its residual base: not exportable.
_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


class PeftFormatError(ValueError):
  """A PEFT adapter that cannot be exported or imported (the message says why)."""


def check_shapes(expected: dict, fields: dict, key_of: Callable[[str], str], what: str) -> None:
  """Raise unless ``fields`` holds exactly the ``expected`` {suffix: shape}; errors name the key."""
  for suffix, shape in expected.items():
    if suffix not in fields:
      raise PeftFormatError(f"The adapter file lacks {key_of(suffix)!r} (expected shape {tuple(shape)}).")
    if tuple(fields[suffix].shape) != tuple(shape):
      raise PeftFormatError(f"{key_of(suffix)!r} has shape {tuple(fields[suffix].shape)} but the "
                            f"model wants {tuple(shape)} for {what}.")
  extra = sorted(set(fields) - set(expected))
  if extra:
    raise PeftFormatError(f"Unexpected tensors for {what}: {[key_of(s) for s in extra]}.")


def _torch_name(path: str, module_prefix: str) -> str:
  return module_prefix + path.replace("/", ".")


def _peft_init(init: str):
  if init in _INIT_TO_PEFT:
    return _INIT_TO_PEFT[init]
  if init.startswith("pissa_niter_"):
    return init
  raise PeftFormatError(
      f"LoRA init {init!r} has no PEFT equivalent, so PEFT could not rebuild the residual base "
      "weight; merge the adapters (lrj.merge) and save the merged model instead.")


def _our_init(value) -> str:
  if value is True:
    return "default"
  if isinstance(value, str) and (value in _INIT_TO_PEFT.values() or value.startswith("pissa_niter_")):
    return value
  raise PeftFormatError(f"PEFT init_lora_weights={value!r} is not supported here (supported: "
                        f"True, 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora').")


def _factor_to_torch(view: layers.LayerView, a: np.ndarray, b: np.ndarray):
  """(lora_A.weight, lora_B.weight) in torch layout from our (fan_in, r), (r, fan_out)."""
  if view.kind == "linear":
    return a.T, b.T
  if view.kind == "conv" and len(view.kernel_shape) == 4:
    kh, kw, cin, _ = view.kernel_shape
    rank = a.shape[1]
    return a.reshape(kh, kw, cin, rank).transpose(3, 2, 0, 1), b.T[:, :, None, None]
  raise PeftFormatError(f"{view.kind} layers (kernel {view.kernel_shape}) have no PEFT LoRA "
                        "layout; export supports nnx.Linear and 2-D nnx.Conv.")


def _factor_from_torch(view: layers.LayerView, a_t: np.ndarray, b_t: np.ndarray):
  if view.kind == "linear":
    return a_t.T, b_t.T
  if view.kind == "conv" and len(view.kernel_shape) == 4:
    return a_t.transpose(2, 3, 1, 0).reshape(-1, a_t.shape[0]), b_t[:, :, 0, 0].T
  raise PeftFormatError(f"{view.kind} layers have no PEFT LoRA layout.")


def _uniform(values: dict[str, Any], what: str):
  distinct = set(values.values())
  if len(distinct) > 1:
    raise PeftFormatError(f"PEFT stores one {what} per adapter; the model mixes {sorted(map(str, distinct))} "
                          f"across {sorted(values)}.")
  return distinct.pop()


class _Site(NamedTuple):
  """One exported module: LoRA factors in our layout and the PEFT options they need."""

  path: str
  view: layers.LayerView
  a: np.ndarray
  b: np.ndarray
  rank: int
  alpha: float
  bias: np.ndarray | None
  magnitude: np.ndarray | None


def _exact_site(path: str, adapter) -> _Site:
  spec = adapter.spec
  return _Site(path, adapter.view, np.asarray(adapter.lora_a[...], np.float32),
               np.asarray(adapter.lora_b[...], np.float32), spec.rank,
               float(spec.rank if spec.alpha is None else spec.alpha),
               None if adapter.lora_bias is None
               else np.asarray(adapter.lora_bias[...], np.float32).reshape(-1),
               np.asarray(adapter.magnitude[...], np.float32) if isinstance(spec, DoRASpec) else None)


def _approximate_site(path: str, adapter, rank: int, rslora: bool) -> tuple[_Site, float]:
  """The rank-``rank`` LoRA closest (Frobenius) to the adapter's update, and its relative error.

  The update is ``effective_kernel - base.kernel`` in the (fan_in, fan_out)
  view; its truncated SVD ``U_r S_r V_r^T`` gives ``a = U_r S_r^(1/2)``,
  ``b = S_r^(1/2) V_r^T`` with alpha chosen so that the LoRA scale is 1.
  """
  if adapter.replaces_base_kernel:
    raise PeftFormatError(
        f"Adapter '{path}' ({adapter.spec.name}) replaced its base kernel at attach, so its update "
        "does not apply to the original torch weights; merge it (lrj.merge) and save the merged "
        "model instead.")
  view = adapter.view
  w0 = np.asarray(view.to_matrix(adapter.base.kernel[...]), np.float64)
  delta = np.asarray(view.to_matrix(adapter.effective_kernel()), np.float64) - w0
  rank = min(rank, view.fan_in, view.fan_out)
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  root = np.sqrt(s[:rank])
  a, b = (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)
  total = float(np.sum(s**2))
  error = float(np.sqrt(np.sum(s[rank:]**2) / total)) if total > 0 else 0.0
  merged = nnx.clone(adapter).merge()
  bias = None
  if getattr(merged, "bias", None) is not None:
    base_bias = (np.zeros(merged.bias.shape, np.float32) if adapter.base.bias is None
                 else np.asarray(adapter.base.bias[...], np.float32))
    bias_delta = np.asarray(merged.bias[...], np.float32) - base_bias
    bias = bias_delta.reshape(-1) if np.any(bias_delta) else None
  alpha = math.sqrt(rank) if rslora else float(rank)
  return _Site(path, view, a, b, rank, alpha, bias, None), error


def export_peft(model: nnx.Module, directory: str, *, module_prefix: str = "",
                base_model_name_or_path: str | None = None,
                approximate_rank: int | None = None) -> dict[str, float]:
  """Write the adapters of ``model`` as a PEFT adapter directory.

  LoRA and DoRA adapters are written exactly, and so are the methods of
  `lowrank_jax.io.peft_methods.METHODS` (LoHa, LoKr, VeRA, ...) in their own
  PEFT format (one method and one spec per model). Adapters of other methods are
  refused, unless ``approximate_rank`` is given: then each is written as the
  rank-``approximate_rank`` LoRA closest to its weight update (truncated SVD of
  ``effective_kernel - base kernel``; a changed bias goes to ``lora_B.bias``),
  and its relative Frobenius error ``||dW - dW_r|| / ||dW||`` is returned and
  written to ``approximation.json`` beside the adapter.

  Args:
    model: an NNX model with adapters (LoRA and DoRA are not mixed).
    directory: output directory (created).
    module_prefix: prepended to our dotted paths to form the torch module names
      (e.g. 'bert.' when the torch model wraps ours as ``.bert``).
    base_model_name_or_path: recorded in the config.
    approximate_rank: rank of the LoRA that approximates adapters PEFT's LoRA
      format cannot hold exactly; None refuses them.

  Returns:
    ``{path: relative error}`` of the approximated sites (empty if none).
  """
  from lowrank_jax.io import peft_methods  # pylint: disable=g-import-not-at-top

  sites = adapter_sites(model)
  if not sites:
    raise PeftFormatError("The model has no adapters to export.")
  if approximate_rank is not None and (not isinstance(approximate_rank, int) or approximate_rank < 1):
    raise PeftFormatError(f"approximate_rank must be a positive integer, got {approximate_rank!r}.")
  if approximate_rank is None and any(type(a.spec) in peft_methods.BY_SPEC for _, a in sites):
    config, tensors = peft_methods.export_methods(
        sites, module_prefix=module_prefix, base_model_name_or_path=base_model_name_or_path)
    _write(directory, config, tensors)
    return {}
  exact = {path: adapter for path, adapter in sites if type(adapter.spec) in (LoRASpec, DoRASpec)}
  others = [(path, adapter) for path, adapter in sites if path not in exact]
  if others and approximate_rank is None:
    path, adapter = others[0]
    raise PeftFormatError(
        f"Adapter '{path}' is {adapter.spec.name}; PEFT's LoRA format holds lora and dora exactly. "
        "Pass approximate_rank=r to export it as its closest rank-r LoRA (the error is reported), "
        "or merge it (lrj.merge) and export the merged model instead.")
  specs = {path: adapter.spec for path, adapter in exact.items()}
  use_dora = bool(_uniform({p: isinstance(s, DoRASpec) for p, s in specs.items()}, "use_dora")) if specs else False
  if use_dora and others:
    raise PeftFormatError(f"PEFT stores one use_dora per adapter; DoRA sites cannot be exported "
                          f"beside approximated {others[0][1].spec.name} sites such as '{others[0][0]}'.")
  use_rslora = _uniform({p: s.rslora for p, s in specs.items()}, "use_rslora") if specs else False
  dropout = _uniform({p: s.dropout for p, s in specs.items()}, "lora_dropout") if specs else 0.0
  init = _uniform({p: _peft_init(s.init) for p, s in specs.items()}, "init_lora_weights") if specs else True
  if others and init is not True:
    raise PeftFormatError(f"PEFT applies init_lora_weights={init!r} to every target, including the "
                          f"approximated sites such as '{others[0][0]}'; export them separately.")
  exported = [_exact_site(path, adapter) for path, adapter in exact.items()]
  errors = {}
  for path, adapter in others:
    site, errors[path] = _approximate_site(path, adapter, approximate_rank, use_rslora)
    exported.append(site)
  if specs:
    use_bias = _uniform({p: s.use_bias for p, s in specs.items()}, "lora_bias")
  else:
    use_bias = any(site.bias is not None for site in exported)
  for site in exported:
    if site.bias is not None and not use_bias:
      raise PeftFormatError(f"Adapter '{site.path}' changes the layer bias, which needs lora_bias=True "
                            "on every target; the exactly exported LoRA sites have no bias.")
  ranks = {site.path: site.rank for site in exported}
  alphas = {site.path: site.alpha for site in exported}
  rank = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)

  tensors = {}
  for site in sorted(exported, key=lambda site: site.path):
    name = _torch_name(site.path, module_prefix)
    a_t, b_t = _factor_to_torch(site.view, site.a, site.b)
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_t)
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_t)
    if use_bias:
      tensors[f"{_PREFIX}{name}.lora_B.bias"] = (
          np.zeros(site.view.fan_out, np.float32) if site.bias is None else site.bias)
    if use_dora:
      tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = site.magnitude
  config = dict(
      peft_type="LORA", task_type=None, base_model_name_or_path=base_model_name_or_path,
      r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora, use_rslora=use_rslora,
      lora_bias=use_bias, bias="none", fan_in_fan_out=False, init_lora_weights=init,
      target_modules=sorted(_torch_name(p, module_prefix) for p in ranks),
      rank_pattern={_torch_name(p, module_prefix): r for p, r in ranks.items() if r != rank},
      alpha_pattern={_torch_name(p, module_prefix): a for p, a in alphas.items() if a != alpha},
      modules_to_save=None, inference_mode=True)
  _write(directory, config, tensors)
  if errors:
    with open(os.path.join(directory, APPROXIMATION_NAME), "w") as f:
      json.dump({"rank": approximate_rank, "relative_error": {
          _torch_name(p, module_prefix): e for p, e in errors.items()}}, f, indent=2, sort_keys=True)
  return errors


def _write(directory: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def _read(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(directory, CONFIG_NAME)
  weights_path = os.path.join(directory, WEIGHTS_NAME)
  for path in (config_path, weights_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: not a PEFT adapter directory.")
  with open(config_path) as f:
    config = json.load(f)
  try:
    tensors = safetensors.numpy.load_file(weights_path)
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise PeftFormatError(f"{weights_path} is not a readable safetensors file: {e}") from None
  from lowrank_jax.io import peft_methods  # pylint: disable=g-import-not-at-top

  if config.get("peft_type") != "LORA" and config.get("peft_type") not in peft_methods.BY_PEFT_TYPE:
    raise PeftFormatError(f"PEFT adapter type {config.get('peft_type')!r} is not supported here; "
                          f"import supports LORA (with use_dora and use_rslora), "
                          f"{', '.join(peft_methods.BY_PEFT_TYPE)}.")
  unsupported = [k for k in ("layer_replication", "modules_to_save", "trainable_token_indices")
                 if config.get(k)]
  if config.get("fan_in_fan_out"):
    unsupported.append("fan_in_fan_out")
  if unsupported:
    raise PeftFormatError(f"PEFT config options {unsupported} are not supported here.")
  return config, tensors


def _pattern_value(patterns: dict[str, Any], name: str, default):
  for key, value in patterns.items():
    if name == key or name.endswith("." + key):
      return value
  return default


def import_peft(directory: str, model: nnx.Module, *, module_prefix: str = "",
                rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Attach the adapters of a PEFT directory to ``model`` and load their weights.

  LoRA / DoRA here; the ``peft_type`` values of `lowrank_jax.io.peft_methods`
  (LOHA, LOKR, VERA, FOURIERFT, HRA, OFT, MISS, ADALORA, BOFT, HIRA) through its table.

  ``model`` is the plain base model (no adapters on the targeted layers). Every
  tensor name and shape is checked against the model before anything is
  attached, so a file for another base raises naming the key and both shapes,
  and the model is left unchanged.
  """
  config, tensors = _read(directory)
  if config["peft_type"] != "LORA":
    from lowrank_jax.io import peft_methods  # pylint: disable=g-import-not-at-top
    return peft_methods.import_methods(config, tensors, model, module_prefix=module_prefix,
                                       rngs=rngs)
  sites: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    if not key.startswith(_PREFIX):
      raise PeftFormatError(f"Unexpected tensor name {key!r} (expected the prefix {_PREFIX!r}).")
    name, _, field = key[len(_PREFIX):].partition(".lora_")
    if not field:
      raise PeftFormatError(f"Tensor {key!r} is not a LoRA tensor.")
    if module_prefix and not name.startswith(module_prefix):
      raise PeftFormatError(f"Tensor {key!r} does not start with the module prefix {module_prefix!r}.")
    sites.setdefault(name[len(module_prefix):].replace(".", "/"), {})["lora_" + field] = value

  modules = dict((("/".join(map(str, p))), m) for p, m in nnx.iter_graph(model)
                 if isinstance(m, nnx.Module))
  use_dora = bool(config.get("use_dora"))
  init = _our_init(config.get("init_lora_weights", True))
  plans = []
  for path, fields in sorted(sites.items()):
    name = _torch_name(path, module_prefix)
    module = modules.get(path)
    if module is None:
      raise PeftFormatError(f"The adapter targets '{name}', which is not a module of the model "
                            f"(our path '{path}').")
    view = layers.view_of(module, path)
    rank = int(_pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    spec_cls = DoRASpec if use_dora else LoRASpec
    spec = spec_cls(rank=rank, alpha=alpha, rslora=bool(config.get("use_rslora")), init=init,
                    dropout=float(config.get("lora_dropout") or 0.0),
                    use_bias=bool(config.get("lora_bias")))
    expected = {}
    a_shape, b_shape = _factor_to_torch(view, np.zeros((view.fan_in, rank), np.float32),
                                        np.zeros((rank, view.fan_out), np.float32))
    expected["lora_A.weight"], expected["lora_B.weight"] = a_shape.shape, b_shape.shape
    if spec.use_bias:
      expected["lora_B.bias"] = (view.fan_out,)
    if use_dora:
      expected["lora_magnitude_vector"] = (view.fan_out,)
    check_shapes(expected, fields, lambda field: f"{_PREFIX}{name}.{field}", f"layer '{path}'")
    plans.append((path, spec, view, fields))

  attach(model, [(re.escape(path), spec) for path, spec, _, _ in plans],
         rngs=rngs if rngs is not None else nnx.Rngs(0))
  adapters = dict(adapter_sites(model))
  for path, spec, view, fields in plans:
    adapter = adapters[path]
    a, b = _factor_from_torch(view, fields["lora_A.weight"], fields["lora_B.weight"])
    adapter.lora_a[...] = a.astype(adapter.lora_a.dtype)
    adapter.lora_b[...] = b.astype(adapter.lora_b.dtype)
    if spec.use_bias:
      adapter.lora_bias[...] = fields["lora_B.bias"].reshape(adapter.lora_bias.shape).astype(
          adapter.lora_bias.dtype)
    if use_dora:
      adapter.magnitude[...] = fields["lora_magnitude_vector"].astype(adapter.magnitude.dtype)
  return model

"""Singular values of every trained projection at init and after training (POET's spectrum claim).

    python -m experiments.weight_spectrum --workdirs=RUN_A,RUN_B [--out=spectrum.json] [--plot=spectrum.png]

POET (Qiu et al., "Reparameterized LLM Training via Orthogonal Equivalence Transformation",
2025) trains ``W = R W0 P`` with orthogonal R, P, so the singular values of W stay those of the
frozen W0 throughout training (merges ``W0 <- R W0 P`` included). For each training workdir
this rebuilds the run's model at init (same config and seed), restores its latest checkpoint,
and compares, for every site matched by ``config.targets``, the singular values of the
effective (fan_in, fan_out) weight: adapter sites through ``effective_matrix()``, densely
trained layers through their kernel. Reported per run: the largest relative change of a
singular value over all sites, ``max_i |s_i(trained) - s_i(init)| / s_1(init)``. The plot shows
both spectra of the site of each run whose spectrum changed most.
"""

from __future__ import annotations

import json
import os
import re

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from flax import nnx

from lowrank_jax.attach import adapters as adapter_sites
from lowrank_jax.attach import path_str
from experiments import loop
from experiments import tasks
from lowrank_jax.adapters import layers

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Training workdirs to compare.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the per-run, per-site spectra.")
_PLOT = flags.DEFINE_string("plot", None, "PNG of the first site's spectra, init and trained.")


def site_matrices(model: nnx.Module, targets: list[str]) -> dict[str, np.ndarray]:
  """{path: effective (fan_in, fan_out) weight} for every module fully matching a target regex."""
  patterns = [re.compile(t) for t in targets]
  found = {path: adapter.effective_matrix() for path, adapter in adapter_sites(model)}
  if not found:
    for path, node in nnx.iter_graph(model):
      name = path_str(path)
      if isinstance(node, layers.SUPPORTED_LAYERS) and any(p.fullmatch(name) for p in patterns):
        found[name] = layers.view_of(node, name).to_matrix(node.kernel[...])
  if not found:
    raise ValueError(f"No site matches targets {targets}.")
  return {path: np.asarray(m, np.float32) for path, m in sorted(found.items())}


def run_spectra(workdir: str) -> dict[str, dict[str, list[float]]]:
  """{path: {'init': singular values, 'trained': singular values}} of one training workdir."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = tasks.get(config.task)
  initial = site_matrices(loop.build_model(config, task), list(config.targets))
  model = loop.build_model(config, task)
  restored = loop.restore_latest(config, workdir)
  nnx.update(model, restored["trainable"])
  if "frozen" in restored:
    nnx.update(model, restored["frozen"])
  trained = site_matrices(model, list(config.targets))
  sv = lambda m: np.linalg.svd(m, compute_uv=False).tolist()
  return {path: {"init": sv(initial[path]), "trained": sv(trained[path])} for path in initial}


def relative_change(spectrum: dict[str, list[float]]) -> float:
  """max_i |s_i(trained) - s_i(init)| / s_1(init) of one site."""
  return float(np.max(np.abs(np.subtract(spectrum["trained"], spectrum["init"]))) / spectrum["init"][0])


def max_relative_change(spectra: dict[str, dict[str, list[float]]]) -> float:
  """The largest `relative_change` over the sites."""
  return max(relative_change(s) for s in spectra.values())


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  results = {}
  for workdir in _WORKDIRS.value:
    spectra = run_spectra(workdir)
    results[workdir] = dict(max_relative_change=max_relative_change(spectra), sites=spectra)
    print(f"{workdir}: {len(spectra)} sites, max |s_i(trained) - s_i(init)| / s_1(init) = "
          f"{results[workdir]['max_relative_change']:.3g}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
  if _PLOT.value:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 2.8), squeeze=False)
    for ax, (workdir, result) in zip(axes[0], results.items()):
      path, spectrum = max(result["sites"].items(), key=lambda item: relative_change(item[1]))
      ax.plot(spectrum["init"], label="init")
      ax.plot(spectrum["trained"], "--", label="trained")
      ax.set_title(f"{os.path.basename(os.path.dirname(workdir.rstrip('/')))}\n{path}", fontsize=8)
      ax.set_xlabel("index i")
      ax.set_ylabel("singular value")
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(_PLOT.value, dpi=80)


if __name__ == "__main__":
  app.run(main)

"""lrj.functional: every registered adapter on Linen models and plain functions.

Each method is checked against lrj.attach on the equivalent NNX model (same
weights, same key): the same adapter parameters at init and the same outputs
after randomizing them, through Linen interception (unmerged) and through a
plain function (merged kernel substituted). A method added to the registry is
checked here with no new test code.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import functional

from lrj_testing import Host
from lrj_testing import randomized

# kind: (NNX layer, Linen twin, input shape); the same layers as the adapter contract suite.
KINDS = {
    "linear": (lambda rngs: nnx.Linear(12, 10, rngs=rngs), lambda: nn.Dense(10, name="layer"),
               (3, 12)),
    "linear_general": (
        lambda rngs: nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=rngs),
        lambda: nn.DenseGeneral((2, 5), axis=(-2, -1), name="layer"), (3, 3, 4)),
    "einsum": (lambda rngs: nnx.Einsum("btd,dnh->btnh", (12, 2, 5), (2, 5), rngs=rngs),
               lambda: nn.Einsum((12, 2, 5), "btd,dnh->btnh", name="layer"), (2, 3, 12)),
    "conv": (lambda rngs: nnx.Conv(2, 9, kernel_size=(2, 2), rngs=rngs),
             lambda: nn.Conv(9, (2, 2), name="layer"), (2, 5, 5, 2)),
}
NAMES = lrj.adapters.names()
CASES = [(name, kind) for name in NAMES for kind in KINDS]
IDS = [f"{name}-{kind}" for name, kind in CASES]
TOL = dict(rtol=1e-6, atol=1e-6)


class LinenHost(nn.Module):
  make: object

  @nn.compact
  def __call__(self, x):
    return self.make()(x)


def _seed(*parts):
  return sum(map(ord, "".join(parts))) * 7919 % (2**31)


def _models(kind, seed):
  """An NNX host and its Linen twin holding the same random kernel and bias."""
  make_nnx, make_linen, x_shape = KINDS[kind]
  model = Host(make_nnx(nnx.Rngs(seed)))
  model.layer.bias[...] = jax.random.normal(jax.random.key(seed + 1), model.layer.bias.shape)
  x = jax.random.normal(jax.random.key(seed + 2), x_shape)
  linen = LinenHost(make_linen)
  variables = linen.init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(lambda v: v, variables)
  layer = dict(variables["params"]["layer"])
  assert layer["kernel"].shape == model.layer.kernel.shape
  assert layer["bias"].size == model.layer.bias.size
  layer["kernel"] = model.layer.kernel[...]
  layer["bias"] = model.layer.bias[...].reshape(layer["bias"].shape)
  return model, linen, {"params": {"layer": layer}}, x


def _plain(seed):
  """A plain function of a params dict and the NNX Linear computing the same."""
  model = Host(nnx.Linear(12, 10, rngs=nnx.Rngs(seed)))
  model.layer.bias[...] = jax.random.normal(jax.random.key(seed + 1), (10,))
  params = {"w": model.layer.kernel[...], "b": model.layer.bias[...]}
  fn = lambda p, x: x @ p["w"] + p["b"]
  return model, fn, params, jax.random.normal(jax.random.key(seed + 2), (3, 12))


def _nnx_adapter_params(model):
  return nnx.to_pure_dict(nnx.state(model, lrj.AdapterParam))["layer"]


def _set_nnx_adapter_params(model, values):
  state = nnx.state(model, lrj.AdapterParam)
  nnx.replace_by_pure_dict(state, {"layer": values})
  nnx.update(model, state)


def _calibration(spec, site, view, seed):
  """Random calibration statistics at ``site`` for specs that declare ``calibration_needs``."""
  needs = getattr(spec, "calibration_needs", ())
  if not needs:
    return None
  shapes = {"grad": (view.fan_in, view.fan_out), "input_sq_norm": (view.fan_in,),
            "input_gram": (view.fan_in, view.fan_in)}
  keys = jax.random.split(jax.random.key(seed + 7), len(needs))
  stats = {need: jax.random.normal(k, shapes[need]) for need, k in zip(needs, keys)}
  return {site: lrj.calibrate.SiteStats(num_tokens=1, **stats)}


def _assert_trees_close(a, b, **tol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_linen_matches_attach(name, kind):
  seed = _seed(name, kind)
  model, linen, variables, x = _models(kind, seed)
  spec = lrj.adapters.get(name)
  key = jax.random.key(seed + 3)
  view = lrj.adapters.view_of(model.layer)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(key),
             calibration=_calibration(spec, "layer", view, seed))
  adapted, adapter_params = functional.adapt(
      linen.apply, variables, [("params/layer", spec)], key=key, example_args=(x,),
      calibration=_calibration(spec, "params/layer", view, seed))
  _assert_trees_close(adapter_params["params/layer"], _nnx_adapter_params(model), rtol=0, atol=0)
  model.eval()
  y_init = adapted(adapter_params, variables, x)
  np.testing.assert_allclose(y_init, model(x), **TOL)
  if model.layer.identity_at_init:
    np.testing.assert_allclose(y_init, linen.apply(variables, x), rtol=1e-5, atol=1e-5)
  # After training-like changes of the adapter params: same outputs, unmerged and merged.
  trained = randomized(adapter_params, seed + 4, 0.3)
  _set_nnx_adapter_params(model, trained["params/layer"])
  y = jax.jit(adapted)(trained, variables, x)
  np.testing.assert_allclose(y, model(x), **TOL)
  # The stand-alone functional.merge rebuilds the adapters from (rules, key) alone.
  merge_alone = functools.partial(
      functional.merge, variables, trained, [("params/layer", spec)], key=key,
      apply_fn=linen.apply, example_args=(x,),
      calibration=_calibration(spec, "params/layer", view, seed))
  if not type(model.layer).mergeable:
    with pytest.raises(ValueError, match="not mergeable"):
      adapted.merge(trained, variables)
    with pytest.raises(ValueError, match="not mergeable"):
      merge_alone()
    return
  merged = adapted.merge(trained, variables)
  _assert_trees_close(merge_alone(), merged, rtol=0, atol=0)
  lrj.merge(model)
  np.testing.assert_allclose(merged["params"]["layer"]["kernel"], model.layer.kernel[...], **TOL)
  np.testing.assert_allclose(linen.apply(merged, x), y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_plain_function_matches_attach(name):
  seed = _seed(name, "plain")
  model, fn, params, x = _plain(seed)
  spec = lrj.adapters.get(name)
  key = jax.random.key(seed + 3)
  view = lrj.adapters.view_of(model.layer)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(key),
             calibration=_calibration(spec, "layer", view, seed))
  adapted, adapter_params = functional.adapt(fn, params, [("w", spec)], key=key,
                                             calibration=_calibration(spec, "w", view, seed))
  _assert_trees_close(adapter_params["w"], _nnx_adapter_params(model), rtol=0, atol=0)
  model.eval()
  trained = randomized(adapter_params, seed + 4, 0.3)
  _set_nnx_adapter_params(model, trained["w"])
  # A plain function has no layer call to route, nor a bias known to belong to 'w': methods
  # that are not mergeable or that train a bias are refused there.
  changes_bias = type(model.layer).mergeable and not np.allclose(
      nnx.clone(model.layer).merge().bias[...], model.layer.base.bias[...])
  if not type(model.layer).mergeable or changes_bias:
    with pytest.raises(ValueError, match="intercepted"):
      adapted(trained, params, x)
    return
  np.testing.assert_allclose(jax.jit(adapted)(trained, params, x), model(x), **TOL)
  vmapped = jax.vmap(adapted, in_axes=(None, None, 0))(trained, params, x[:, None])
  np.testing.assert_allclose(vmapped[:, 0], model(x), **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_on_adapter_params_lowers_loss_without_recompiles(name):
  seed = _seed(name, "train")
  model, linen, variables, x = _models("linear", seed)
  spec = lrj.adapters.get(name)
  adapted, adapter_params = functional.adapt(
      linen.apply, variables, [("params/layer", spec)], key=jax.random.key(1),
      calibration=_calibration(spec, "params/layer", lrj.adapters.view_of(model.layer), seed))
  # Target: the same method with random adapter parameters, within reach of every method.
  target = adapted(randomized(adapter_params, seed, 0.5), variables, x)
  tx = optax.adam(3e-2)
  opt_state = tx.init(adapter_params)
  traces = []

  @jax.jit
  def step(adapter_params, opt_state, variables, x):
    traces.append(None)
    loss_fn = lambda ap: jnp.mean((adapted(ap, variables, x) - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(adapter_params)
    updates, opt_state = tx.update(grads, opt_state, adapter_params)
    return optax.apply_updates(adapter_params, updates), opt_state, loss

  losses = []
  for _ in range(20):
    adapter_params, opt_state, loss = step(adapter_params, opt_state, variables, x)
    losses.append(float(loss))
  # As in the adapter contract: methods whose update is constrained by design (POET only
  # rotates W0) must make clear progress, the others fall by 10%.
  adapter_type = type(adapted.adapter("params/layer", adapter_params, adapted.frozen,
                                      dict(functional._flat(variables))))
  factor = 0.98 if getattr(adapter_type, "constrained_update", False) else 0.9
  assert losses[-1] < factor * losses[0], losses
  assert len(traces) == 1


def test_linen_dense_without_example_args_and_nested_paths():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(6, name="query")(x)
      return nn.Dense(4, name="out")(jax.nn.gelu(h))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Block(name="block_0")(Block(name="block_1")(x))

  x = jax.random.normal(jax.random.key(0), (2, 4))
  net = Net()
  variables = net.init(jax.random.key(1), x)
  rules = [(r"params/block_\d/query", lrj.adapters.lora(rank=2)), (".*", None)]
  adapted, adapter_params = functional.adapt(net.apply, variables, rules, key=jax.random.key(2))
  assert sorted(adapter_params) == ["params/block_0/query", "params/block_1/query"]
  np.testing.assert_allclose(adapted(adapter_params, variables, x), net.apply(variables, x),
                             rtol=1e-6, atol=1e-6)
  trained = randomized(adapter_params, 3, 0.3)
  np.testing.assert_allclose(adapted(trained, variables, x),
                             net.apply(adapted.merge(trained, variables), x), rtol=2e-5, atol=2e-5)


def test_weight_aware_init_keeps_function_and_holds_residual():
  _, linen, variables, x = _models("linear", 5)
  adapted, adapter_params = functional.adapt(
      linen.apply, variables, [("params/layer", lrj.adapters.lora(rank=3, init="pissa"))],
      key=jax.random.key(0))
  residual = adapted.frozen["params/layer"]["residual"]
  kernel = variables["params"]["layer"]["kernel"]
  a, b = adapter_params["params/layer"]["lora_a"], adapter_params["params/layer"]["lora_b"]
  scale = lrj.adapters.lora(rank=3).scale
  np.testing.assert_allclose(residual + scale * a @ b, kernel, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapted(adapter_params, variables, x), linen.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  # frozen state passed explicitly gives the same function.
  np.testing.assert_allclose(adapted.call(adapter_params, adapted.frozen, variables, x),
                             adapted(adapter_params, variables, x), rtol=0, atol=0)


def test_peft_export_matches_nnx_export(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  model, linen, variables, x = _models("linear", 7)
  spec = lrj.adapters.lora(rank=2, alpha=4)
  key = jax.random.key(1)
  lrj.attach(model, [("layer", spec)], rngs=nnx.Rngs(key))
  adapted, adapter_params = functional.adapt(linen.apply, variables, [("params/layer", spec)], key=key)
  trained = randomized(adapter_params, 2, 0.3)
  _set_nnx_adapter_params(model, trained["params/layer"])
  from lowrank_jax.io import peft  # pylint: disable=g-import-not-at-top
  peft.export_peft(model, str(tmp_path / "nnx"))
  functional.export_peft(adapted, trained, variables, str(tmp_path / "functional"))
  ours = safetensors_numpy.load_file(str(tmp_path / "functional" / peft.WEIGHTS_NAME))
  reference = safetensors_numpy.load_file(str(tmp_path / "nnx" / peft.WEIGHTS_NAME))
  assert sorted(ours) == sorted(reference) == ["base_model.model.layer.lora_A.weight",
                                               "base_model.model.layer.lora_B.weight"]
  for k in ours:
    np.testing.assert_array_equal(ours[k], reference[k])
  assert ((tmp_path / "functional" / peft.CONFIG_NAME).read_text()
          == (tmp_path / "nnx" / peft.CONFIG_NAME).read_text())


# -- bad input --------------------------------------------------------------------------
def test_rule_matching_nothing_lists_candidates():
  _, linen, variables, _ = _models("linear", 1)
  with pytest.raises(ValueError, match=r"match no params site.*params/layer"):
    functional.adapt(linen.apply, variables, [("params/query", lrj.adapters.lora())],
                     key=jax.random.key(0))


def test_rule_selecting_a_non_kernel_leaf():
  _, linen, variables, _ = _models("linear", 1)
  with pytest.raises(ValueError, match=r"params/layer/bias.*not a 2-D-reducible kernel"):
    functional.adapt(linen.apply, variables, [("params/layer/bias", lrj.adapters.lora())],
                     key=jax.random.key(0))


def test_kernel_with_more_dims_needs_example_args():
  _, linen, variables, _ = _models("conv", 1)
  with pytest.raises(ValueError, match=r"params/layer.*example_args"):
    functional.adapt(linen.apply, variables, [("params/layer", lrj.adapters.lora())],
                     key=jax.random.key(0))


def test_adapter_params_from_another_model():
  _, linen, variables, x = _models("linear", 1)
  adapted, adapter_params = functional.adapt(linen.apply, variables,
                                             [("params/layer", lrj.adapters.lora(rank=2))],
                                             key=jax.random.key(0))
  _, other = functional.adapt(linen.apply, variables,
                              [("params/layer", lrj.adapters.lora(rank=3))], key=jax.random.key(0))
  with pytest.raises(functional.AdapterTreeError, match=r"'params/layer/lora_a' has shape \(12, 3\)"):
    adapted(other, variables, x)
  renamed = {"params/other": adapter_params["params/layer"]}
  with pytest.raises(functional.AdapterTreeError, match=r"first differing path expected 'params/layer/lora_a'"):
    adapted(renamed, variables, x)


def test_linen_vit_twin_matches_nnx_vit_with_adapters():
  from lowrank_jax.models import vit, vit_linen  # pylint: disable=g-import-not-at-top
  config = vit.ViTConfig(dim=16, depth=2, heads=2, mlp_dim=32)
  model = vit.ViT(config, rngs=nnx.Rngs(0))
  variables = vit_linen.variables_from_nnx(model)
  linen = vit_linen.ViT(config)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  np.testing.assert_array_equal(linen.apply(variables, x), model(x))
  spec = lrj.adapters.dora(rank=2)
  lrj.attach(model, [(r"blocks/\d+/(attn/query|mlp/up)", spec)], rngs=nnx.Rngs(2))
  adapted, adapter_params = functional.adapt(
      linen.apply, variables, [(r"params/blocks_\d+/(attn/query|mlp/up)", spec)],
      key=jax.random.key(3))
  trained = randomized(adapter_params, 4, 0.3)
  state = nnx.state(model, lrj.AdapterParam)
  nnx.replace_by_pure_dict(state, {"blocks": {
      i: {"attn": {"query": trained[f"params/blocks_{i}/attn/query"]},
          "mlp": {"up": trained[f"params/blocks_{i}/mlp/up"]}} for i in range(config.depth)}})
  nnx.update(model, state)
  # Both eager: jit may fuse differently on either side, beyond 1e-6 after two blocks.
  np.testing.assert_allclose(adapted(trained, variables, x), model(x), **TOL)


def test_adapter_dropout_only_with_a_dropout_key():
  _, linen, variables, x = _models("linear", 3)
  adapted, adapter_params = functional.adapt(
      linen.apply, variables, [("params/layer", lrj.adapters.lora(rank=2, dropout=0.5))],
      key=jax.random.key(0))
  trained = randomized(adapter_params, 1, 0.3)
  deterministic = adapted(trained, variables, x)
  np.testing.assert_array_equal(deterministic, adapted(trained, variables, x))
  first = adapted(trained, variables, x, dropout_key=jax.random.key(1))
  second = adapted(trained, variables, x, dropout_key=jax.random.key(2))
  assert float(jnp.abs(first - deterministic).max()) > 1e-3
  assert float(jnp.abs(first - second).max()) > 1e-3
  np.testing.assert_allclose(
      jax.jit(lambda ap, k: adapted(ap, variables, x, dropout_key=k))(trained, jax.random.key(1)),
      first, rtol=1e-5, atol=1e-5)


def test_dataclass_pytree_with_out_in_weight():
  """An Equinox-style pytree (attributes, torch-like (out, in) weight) through the merged path."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Linear:
    weight: jax.Array
    bias: jax.Array

  layer = Linear(jax.random.normal(jax.random.key(0), (6, 9)), jnp.ones((6,)))
  fn = lambda m, x: x @ m.weight.T + m.bias
  x = jax.random.normal(jax.random.key(1), (3, 9))
  adapted, adapter_params = functional.adapt(fn, layer, [("weight", lrj.adapters.lora(rank=2))],
                                             key=jax.random.key(2))
  assert adapter_params["weight"]["lora_a"].shape == (6, 2)  # read as (fan_in, fan_out) = (6, 9)
  np.testing.assert_allclose(adapted(adapter_params, layer, x), fn(layer, x), rtol=1e-6, atol=1e-6)
  trained = randomized(adapter_params, 3, 0.3)
  merged = adapted.merge(trained, layer)
  assert isinstance(merged, Linear)
  np.testing.assert_allclose(adapted(trained, layer, x), fn(merged, x), rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda ap: adapted(ap, layer, x).sum())(trained)
  assert float(jnp.abs(grads["weight"]["lora_b"]).max()) > 0

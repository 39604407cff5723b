"""Multi-adapter layers: identity at init, weighted combination, merge, routing, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.adapters import multi

from lrj_testing import Host

SPECS = {"math": lrj.adapters.lora(rank=2, alpha=4.0), "code": lrj.adapters.lora(rank=3),
         "chat": lrj.adapters.lora(rank=1, rslora=True, alpha=2.0)}


def _model(kind="linear", seed=0, **spec_kw):
  rngs = nnx.Rngs(seed)
  if kind == "linear":
    layer, x_shape = nnx.Linear(12, 10, rngs=rngs), (6, 12)
  else:
    layer, x_shape = nnx.Conv(2, 9, kernel_size=(2, 2), rngs=rngs), (2, 5, 5, 2)
  layer.bias[...] = jax.random.normal(jax.random.key(seed + 1), layer.bias.shape)
  model = Host(layer)
  x = jax.random.normal(jax.random.key(seed + 2), x_shape)
  return model, x


def _attach(model, **spec_kw):
  if spec_kw:
    lrj.attach(model, [("layer", multi.MultiSpec(adapters=SPECS, **spec_kw))], rngs=nnx.Rngs(3))
  else:
    lrj.attach(model, "layer", adapters=SPECS, rngs=nnx.Rngs(3))
  state = nnx.state(model, lrj.AdapterParam)
  keys = iter(jax.random.split(jax.random.key(4), 16))
  nnx.update(model, jax.tree_util.tree_map(
      lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape), state))
  return model.layer


def _single(model_kind, name, x, seed=0):
  """The output of the same layer with only adapter ``name``: base + its low-rank path."""
  model, _ = _model(model_kind, seed)
  layer = _attach(model)
  layer.set_active(name)
  return layer(x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_identity_at_init_and_param_count(kind):
  model, x = _model(kind)
  y_base = model(x)
  lrj.attach(model, "layer", adapters=SPECS, rngs=nnx.Rngs(3))
  layer = model.layer
  for active in ("math", {"math": 0.5, "code": 2.0}, ["math", "code", "chat"]):
    layer.set_active(active)
    np.testing.assert_allclose(model(x), y_base, rtol=1e-6, atol=1e-6)
  if kind == "linear":
    np.testing.assert_allclose(layer(x, adapter_ids=jnp.array([0, 1, 2, -1, 0, 1])), y_base,
                               rtol=1e-6, atol=1e-6)
  added = sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(model, lrj.AdapterParam)))
  assert added == layer.spec.num_params(layer.view.fan_in, layer.view.fan_out)
  assert added == sum(s.num_params(layer.view.fan_in, layer.view.fan_out) for s in SPECS.values())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weighted_combination_is_sum_of_weighted_deltas_and_merges(kind):
  model, x = _model(kind)
  layer = _attach(model)
  y_base = layer.base(x)
  weights = {"math": 0.5, "chat": -1.5}
  layer.set_active(weights)
  y = model(x)
  want = y_base + sum(w * (_single(kind, n, x) - y_base) for n, w in weights.items())
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  delta = sum(w * layer.adapters[n].delta() for n, w in weights.items())
  np.testing.assert_allclose(layer.delta(), delta, rtol=1e-6, atol=1e-6)
  lrj.merge(model, keep_adapters=True)
  np.testing.assert_allclose(model(x), y, rtol=2e-5, atol=2e-5)
  lrj.unmerge(model)
  np.testing.assert_allclose(model(x), y, rtol=2e-5, atol=2e-5)
  lrj.merge(model)
  assert type(model.layer) is type(layer.base)
  np.testing.assert_allclose(model(x), y, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_routing_matches_each_row_with_its_own_adapter(implementation):
  model, x = _model("linear")
  layer = _attach(model, implementation=implementation, interpret=True)
  ids = jnp.array([2, 0, -1, 1, 1, 0])
  y = layer(x, adapter_ids=ids)
  names = layer.names
  for m, g in enumerate(ids.tolist()):
    want = layer.base(x[m:m + 1]) if g < 0 else _single("linear", names[g], x[m:m + 1])
    np.testing.assert_allclose(y[m:m + 1], want, rtol=1e-5, atol=1e-5)


def test_grads_only_for_adapter_params_and_only_routed_adapters():
  model, x = _model("linear")
  _attach(model)
  graphdef, params, rest = nnx.split(model, lrj.AdapterParam, ...)
  ids = jnp.array([0, 0, 2, -1, 2, 0])  # 'code' (id 1) is used by no row

  @jax.jit
  def grads(params, rest, ids):
    def loss(params):
      layer = nnx.merge(graphdef, params, rest).layer
      return jnp.sum(layer(x, adapter_ids=ids) ** 2)
    return jax.grad(loss)(params)

  g = grads(params, rest, ids)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
  per = {n: max(float(jnp.abs(t).max()) for t in jax.tree_util.tree_leaves(g["layer"]["adapters"][n]))
         for n in SPECS}
  assert per["math"] > 0 and per["chat"] > 0 and per["code"] == 0.0
  assert not jax.tree_util.tree_leaves(nnx.state(model.layer.base, lrj.AdapterParam))


def test_set_adapter_ids_routes_a_whole_model_under_jit():
  model, x = _model("linear")
  layer = _attach(model)
  ids = jnp.array([1, 1, 0, 2, -1, 0])
  want = layer(x, adapter_ids=ids)
  multi.set_adapter_ids(model, ids)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), want, rtol=1e-6, atol=1e-6)
  multi.set_adapter_ids(model, None)
  layer.set_active("code")
  np.testing.assert_allclose(model(x), _single("linear", "code", x), rtol=1e-6, atol=1e-6)


def test_add_builds_a_new_inactive_adapter():
  model, x = _model("linear")
  layer = _attach(model)
  y = model(x)
  layer.add("extra", lrj.adapters.lora(rank=4), rngs=nnx.Rngs(9))
  assert layer.names == ["math", "code", "chat", "extra"]
  np.testing.assert_allclose(model(x), y, rtol=1e-6, atol=1e-6)  # not active, and B = 0
  layer.set_active(["math", "extra"])
  np.testing.assert_allclose(model(x), _single("linear", "math", x), rtol=1e-5, atol=1e-5)


def test_bad_input_errors():
  model, x = _model("linear")
  layer = _attach(model)
  with pytest.raises(ValueError, match="unknown adapters \\['nope'\\]"):
    layer.set_active({"nope": 1.0})
  with pytest.raises(ValueError, match="already exists"):
    layer.add("math", lrj.adapters.lora(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rewrites the shared base"):
    layer.add("p", lrj.adapters.lora(rank=2, init="pissa"), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="additive LoRA-family"):
    layer.add("d", lrj.adapters.dora(rank=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[-1, 3\)"):
    layer(x, adapter_ids=jnp.array([0, 1, 2, 3, 0, 0]))
  with pytest.raises(ValueError, match="at least one"):
    multi.MultiSpec(adapters={})
  conv, xc = _model("conv")
  conv_layer = _attach(conv)
  with pytest.raises(ValueError, match="'layer'.*nnx.Linear"):
    conv_layer(xc, adapter_ids=jnp.array([0, 1]))
  with pytest.raises(ValueError, match="no multi-adapter"):
    multi.set_adapter_ids(_model("linear")[0], jnp.array([0]))

"""The Stiefel wrapper: orthonormality kept, tangent Riemannian gradient, errors; StelLA end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import linalg
from lowrank_jax.optim import riemannian


def _orthonormal(key, m, n):
  return linalg.orthonormalize(jax.random.normal(key, (m, n)))


def _problem(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"site": {"stella_v": _orthonormal(k[0], 12, 3), "stella_u": _orthonormal(k[1], 10, 3),
                     "stella_s": jnp.eye(3)},
            "wide": {"stella_u": _orthonormal(k[2], 9, 4).T}}  # orthonormal rows
  target = jax.random.normal(k[3], (12, 10))
  def loss(p):
    site = p["site"]
    fit = site["stella_v"] @ site["stella_s"] @ site["stella_u"].T
    return jnp.sum((fit - target) ** 2) + jnp.sum(p["wide"]["stella_u"][:, :4] ** 3)
  return params, loss


def _gram_error(x):
  x = x if x.shape[0] >= x.shape[1] else x.T
  return float(jnp.abs(x.T @ x - jnp.eye(x.shape[1])).max())


@pytest.mark.parametrize("retraction", ["polar", "qr"])
def test_stiefel_adam_keeps_orthonormality_and_descends(retraction):
  params, loss = _problem()
  tx = riemannian.stiefel(optax.adam(5e-2), retraction=retraction)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(150):
    params, state, value = step(params, state)
    losses.append(float(value))
    for x in (params["site"]["stella_u"], params["site"]["stella_v"], params["wide"]["stella_u"]):
      assert _gram_error(x) < 1e-5
  assert losses[-1] < 0.5 * losses[0]
  # S is not on the manifold: plain Adam moved it away from I.
  assert float(jnp.abs(params["site"]["stella_s"] - jnp.eye(3)).max()) > 0.1


def test_riemannian_gradient_is_tangent_and_first_order_step():
  k = jax.random.split(jax.random.key(1), 2)
  x = _orthonormal(k[0], 11, 4)
  g = jax.random.normal(k[1], (11, 4))
  xi = riemannian.riemannian_grad(x, g)
  np.testing.assert_allclose(x.T @ xi + xi.T @ x, 0.0, atol=1e-5)
  # A tiny SGD step moves X by -lr * P_X(rgrad) to first order, staying on the manifold.
  lr = 1e-4
  tx = riemannian.stiefel(optax.sgd(lr), mask=True)
  update, _ = tx.update(g, tx.init(x), x)
  expected = -lr * linalg.stiefel_project(x, xi)
  np.testing.assert_allclose(update, expected, atol=lr * 1e-2)
  assert _gram_error(x + update) < 1e-5


def test_hidden_size_scaling_shrinks_the_step():
  x = _orthonormal(jax.random.key(2), 16, 2)
  g = jax.random.normal(jax.random.key(3), (16, 2))
  plain = riemannian.stiefel(optax.sgd(1e-4), mask=True)
  scaled = riemannian.stiefel(optax.sgd(1e-4), mask=True, hidden_size=4.0)
  u_plain, _ = plain.update(g, plain.init(x), x)
  u_scaled, _ = scaled.update(g, scaled.init(x), x)
  np.testing.assert_allclose(u_scaled, u_plain / 2.0, rtol=1e-2, atol=2e-7)  # sqrt(16 / 4) = 2


def test_bad_input():
  with pytest.raises(ValueError, match="retraction"):
    riemannian.stiefel(optax.adam(1e-3), retraction="cayley")
  with pytest.raises(ValueError, match="hidden_size"):
    riemannian.stiefel(optax.adam(1e-3), hidden_size=0)
  params = {"layer": {"stella_u": jnp.ones((3,)), "bias": jnp.ones((3,))}}
  tx = riemannian.stiefel(optax.adam(1e-3))
  with pytest.raises(ValueError, match="layer/stella_u.*2-D"):
    tx.init(params)
  ok = {"layer": {"stella_u": jnp.eye(3)}}
  with pytest.raises(ValueError, match="needs params"):
    tx.update(ok, tx.init(ok))


class _Host(nnx.Module):

  def __init__(self):
    self.layer = nnx.Linear(12, 10, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.layer(x)


def test_stella_adapter_trains_on_the_manifold():
  model = _Host()
  x = jax.random.normal(jax.random.key(4), (32, 12))
  k_u, k_v = jax.random.split(jax.random.key(5))
  update = _orthonormal(k_v, 12, 2) @ jnp.diag(jnp.array([2.0, 1.0])) @ _orthonormal(k_u, 10, 2).T
  target = model(x) + x @ update
  lrj.attach(model, [("layer", lrj.adapters.stella(rank=4))], rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, lrj.optim.get("stella", learning_rate=2e-2), wrt=lrj.AdapterParam)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lrj.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(100)]
  assert losses[-1] < 0.1 * losses[0]
  assert _gram_error(model.layer.stella_u[...]) < 1e-5
  assert _gram_error(model.layer.stella_v[...]) < 1e-5

"""LoRA-pair optimizers: transformation invariance where claimed, LoRA+ ratio, LoRA-Pro's projection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lrj

S = 2.0  # adapter scale


def _problem(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(k[0], (40, 12))
  w0 = jax.random.normal(k[1], (12, 10)) / 4
  y = x @ (w0 + jax.random.normal(k[2], (12, 3)) @ jax.random.normal(k[3], (3, 10)) / 3)
  params = {"site": {"lora_a": jax.random.normal(k[4], (12, 4)) / 2,
                     "lora_b": jax.random.normal(k[5], (4, 10)) / 2},
            "head": jnp.ones((3,))}

  def loss(p):
    w = w0 + S * p["site"]["lora_a"] @ p["site"]["lora_b"]
    return 0.5 * jnp.mean((x @ w - y) ** 2) + jnp.sum((p["head"] - 2.0) ** 2)

  return params, loss


def _regauge(params, n):
  site = params["site"]
  return {"site": {"lora_a": site["lora_a"] @ n, "lora_b": jnp.linalg.solve(n, site["lora_b"])},
          "head": params["head"]}


def _gauge():
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(7), (4, 4)))
  return q @ jnp.diag(jnp.array([0.5, 0.8, 1.3, 2.0]))


def _run(tx, params, loss, steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s: _step(tx, loss, p, s))
  for _ in range(steps):
    params, state = step(params, state)
  return params


def _step(tx, loss, params, state):
  updates, state = tx.update(jax.grad(loss)(params), state, params)
  return optax.apply_updates(params, updates), state


def _product(params):
  return params["site"]["lora_a"] @ params["site"]["lora_b"]


@pytest.mark.parametrize("name,hp", [("scaled_gd", dict(delta=1e-7)),
                                     ("scaled_gd", dict(delta=1e-7, momentum=0.9)),
                                     ("altlora", dict(reg=1e-7))])
def test_trajectory_is_invariant_under_regauging(name, hp):
  params, loss = _problem()
  tx = lrj.optim.get(name, learning_rate=0.05, **hp)
  end = _run(tx, params, loss, 10)
  end_gauged = _run(tx, _regauge(params, _gauge()), loss, 10)
  np.testing.assert_allclose(_product(end_gauged), _product(end), rtol=2e-3, atol=2e-4)
  assert loss(end) < loss(params)
  # Plain Adam is not invariant: the same check fails.
  adam_end = _run(optax.adam(0.05), params, loss, 10)
  adam_gauged = _run(optax.adam(0.05), _regauge(params, _gauge()), loss, 10)
  assert float(jnp.abs(_product(adam_end) - _product(adam_gauged)).max()) > 1e-2


def test_lora_pro_induced_update_is_the_tangent_projection_of_the_full_gradient():
  params, loss = _problem()
  grads = jax.grad(loss)(params)
  a, b = params["site"]["lora_a"], params["site"]["lora_b"]
  tx = lrj.optim.get("lora_pro", learning_rate=1.0, scale=S, delta=1e-8)
  updates, _ = tx.update(grads, tx.init(params), params)
  induced = S * (updates["site"]["lora_a"] @ b + a @ updates["site"]["lora_b"])
  # G such that grad_a = s G b^T and grad_b = s a^T G: the loss's gradient w.r.t. W.
  w_grad = _full_gradient(params)
  p_col = a @ jnp.linalg.solve(a.T @ a, a.T)          # projector onto col(a) (fan_in side)
  p_row = b.T @ jnp.linalg.solve(b @ b.T, b)          # projector onto row(b) (fan_out side)
  expected = -(p_col @ w_grad + w_grad @ p_row - p_col @ w_grad @ p_row)
  np.testing.assert_allclose(induced, expected, rtol=2e-3, atol=2e-5)
  # ... and it is the same after regauging.
  gauged = _regauge(params, _gauge())
  updates_g, _ = tx.update(jax.grad(loss)(gauged), tx.init(gauged), gauged)
  a_g, b_g = gauged["site"]["lora_a"], gauged["site"]["lora_b"]
  induced_g = S * (updates_g["site"]["lora_a"] @ b_g + a_g @ updates_g["site"]["lora_b"])
  np.testing.assert_allclose(induced_g, induced, rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(updates["head"], -grads["head"])  # other leaves: plain SGD


def _full_gradient(params):
  _, loss = _problem()
  a, b = params["site"]["lora_a"], params["site"]["lora_b"]
  def loss_of_delta(d):
    # W = w0 + s a b + d: the gradient w.r.t. d at 0 is dL/dW.
    shifted = {"site": {"lora_a": jnp.concatenate([a, d / S], 1),
                        "lora_b": jnp.concatenate([b, jnp.eye(10)], 0)}, "head": params["head"]}
    return loss(shifted)
  return jax.grad(loss_of_delta)(jnp.zeros((12, 10)))


def test_lora_plus_scales_the_b_learning_rate():
  params, loss = _problem()
  grads = jax.grad(loss)(params)
  plain = optax.adamw(1e-2, weight_decay=0.0)
  plus = lrj.optim.get("lora_plus", learning_rate=1e-2, ratio=16.0)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_plus, _ = plus.update(grads, plus.init(params), params)
  np.testing.assert_allclose(u_plus["site"]["lora_b"], 16.0 * u_plain["site"]["lora_b"], rtol=1e-6)
  np.testing.assert_allclose(u_plus["site"]["lora_a"], u_plain["site"]["lora_a"], rtol=1e-6)
  np.testing.assert_allclose(u_plus["head"], u_plain["head"], rtol=1e-6)


@pytest.mark.parametrize("name", ["scaled_gd", "scaled_adamw", "lora_pro", "altlora", "lora_plus"])
def test_each_optimizer_descends_on_adapter_sites(name):
  params, loss = _problem(seed=3)
  lr = {"scaled_gd": 0.05, "lora_pro": 0.05, "altlora": 0.05}.get(name, 1e-2)
  end = _run(lrj.optim.get(name, learning_rate=lr), params, loss, 30)
  assert loss(end) < 0.7 * loss(params)


def test_bad_input():
  params, loss = _problem()
  grads = jax.grad(loss)(params)
  half = {"site": {"lora_a": params["site"]["lora_a"]}}
  with pytest.raises(ValueError, match="site 'site' has \\['lora_a'\\]"):
    tx = lrj.optim.get("scaled_gd", learning_rate=0.1)
    tx.update({"site": {"lora_a": grads["site"]["lora_a"]}}, tx.init(half), half)
  with pytest.raises(ValueError, match="needs params"):
    tx = lrj.optim.get("lora_pro", learning_rate=0.1)
    tx.update(grads, tx.init(params))
  with pytest.raises(ValueError, match="ratio"):
    lrj.optim.get("lora_plus", learning_rate=0.1, ratio=0.0)
  with pytest.raises(ValueError, match="b1"):
    lrj.optim.get("altlora", learning_rate=0.1, b1=1.0)
  with pytest.raises(ValueError, match="lora_b \\(5, 10\\)"):
    bad = {"site": {"lora_a": jnp.ones((12, 4)), "lora_b": jnp.ones((5, 10))}}
    lrj.optim.get("altlora", learning_rate=0.1).init(bad)

"""The README's Python examples run as written."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lab_optax

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_trains_and_keeps_two_values():
  scope = {}
  exec(python_blocks()[0], scope)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
  params, opt_state = scope["params"], scope["opt_state"]
  first = float(scope["loss_fn"](params, x, y))
  for _ in range(30):
    params, opt_state = scope["step"](params, opt_state, x, y)
  assert float(scope["loss_fn"](params, x, y)) < first
  assert len(np.unique(np.abs(np.asarray(params["kernel"])))) == 1


def test_nnx_example_runs():
  scope = {"lab_optax": __import__("lab_optax")}
  exec(python_blocks()[1], scope)
  model = scope["model"]
  out = model(jnp.ones((4, 784)))
  assert out.shape == (4, 10)
  assert jax.tree.leaves(scope["optimizer"].opt_state)


def test_custom_projection_trains_on_its_level_set():
  block = next(b for b in python_blocks() if "class PowerOfTwoBinary" in b)
  scope = {}
  exec(block, scope)
  tx = scope["tx"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 20)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  params = {
    "kernel": jnp.asarray(rng.normal(size=(20, 5)) * 0.1, jnp.float32),
    "bias": jnp.zeros(5),
  }
  opt_state = tx.init(params)
  params = lab_optax.quantize_params(params, opt_state)

  def loss_fn(p):
    return jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  first = float(loss_fn(params))
  for _ in range(50):
    params, opt_state = step(params, opt_state)
    magnitudes = np.unique(np.abs(np.asarray(params["kernel"])))
    assert len(magnitudes) == 1 and float(np.log2(magnitudes[0])).is_integer()
  assert float(loss_fn(params)) < first

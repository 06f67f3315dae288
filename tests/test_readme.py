"""The README's Python examples run as written."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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

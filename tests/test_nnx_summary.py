"""lab_optax.summary on models whose figures are known by hand."""

import jax.numpy as jnp
from flax import nnx

import lab_optax
from lab_optax.nnx import BinaryLinear, BinaryLSTMCell


class Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = BinaryLinear(100, 64, rngs=rngs)  # 6400 binary + 64 bias
    self.bn = nnx.BatchNorm(64, rngs=rngs)  # 64 scale + 64 bias + 128 statistics
    self.out = nnx.Linear(64, 10, rngs=rngs)  # 650 full precision


def test_summary_figures_by_hand():
  printed = []
  s = lab_optax.summary(Net(nnx.Rngs(0)), print_fn=printed.append)
  assert [(layer.path, layer.kind) for layer in s.layers] == [
    ("bn", "BatchNorm"),
    ("hidden", "BinaryLinear"),
    ("out", "Linear"),
  ]
  hidden = s.layers[1]
  assert (hidden.binary_params, hidden.float_params, hidden.alphas) == (6400, 64, 1)
  assert hidden.float32_bytes == 4 * 6464
  assert hidden.binary_bytes == 6400 / 8 + 4 * (1 + 64)
  assert s.layers[0].float_params == 256 and s.layers[2].float_params == 650
  assert s.binary_params == 6400 and s.float_params == 64 + 256 + 650 and s.alphas == 1
  assert s.float32_bytes == 4 * (6400 + 970)
  assert s.binary_bytes == 800 + 4 * (1 + 970)
  assert abs(s.compression - 29480 / 4684) < 1e-9
  text = printed[0]
  assert "hidden" in text and "BinaryLinear" in text and "6,400" in text and "Total" in text
  assert f"Compression: {29480 / 4684:.1f}x" in text


def test_summary_counts_per_channel_alphas_and_lstm_matrices():
  layer = BinaryLinear(4, 3, rngs=nnx.Rngs(0))
  layer.kernel.set_value(jnp.array([0.1, 0.2, 0.3]) * jnp.ones((4, 3)))
  assert lab_optax.summary(layer, print_fn=None).alphas == 3
  cell = BinaryLSTMCell(5, 7, rngs=nnx.Rngs(0))
  s = lab_optax.summary(cell, print_fn=None)
  assert s.binary_params == 4 * 35 + 4 * 49 and s.alphas == 8 and s.float_params == 28
  assert len(s.layers) == 8


def test_one_weight_per_channel_counts_one_alpha():
  layer = BinaryLinear(1, 3, rngs=nnx.Rngs(0))
  layer.kernel.set_value(jnp.array([[0.4, -0.2, 0.3]]))
  assert lab_optax.summary(layer, print_fn=None).alphas == 1

"""lab_optax.summary on models whose figures are known by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


class PlainCNN(nnx.Module):
  """The Flax NNX MNIST tutorial's CNN, smaller: plain nnx.Conv and nnx.Linear layers."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(32, 16, rngs=rngs)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.conv1(x)))
    x = pool(nnx.relu(self.conv2(x)))
    x = nnx.relu(self.linear1(x.reshape(x.shape[0], -1)))
    return self.linear2(x)


def train_with_lab(per_channel, steps=3):
  """A PlainCNN trained with lab_optax.lab's default mask: every kernel is binarized."""
  return train_with(lab_optax.lab(1e-2, per_channel=per_channel), steps)


KERNELS = {"conv1": (36, 4), "conv2": (288, 8), "linear1": (512, 16), "linear2": (160, 10)}


# test_nnx_model.py's pack_model test compares the summary of the same trained
# model by default; both layouts here with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("per_channel", [False, True])
def test_summary_counts_binarized_kernels_of_plain_layers(per_channel):
  fresh = lab_optax.summary(PlainCNN(nnx.Rngs(0)), print_fn=None)
  assert fresh.binary_params == 0 and fresh.alphas == 0
  assert fresh.full_precision == tuple(f"{name}/kernel" for name in KERNELS)
  model = train_with_lab(per_channel)
  printed = []
  s = lab_optax.summary(model, print_fn=printed.append)
  figures = {
    layer.path: (layer.binary_params, layer.alphas, layer.float_params) for layer in s.layers
  }
  assert figures == {
    name: (size, channels if per_channel else 1, channels)
    for name, (size, channels) in KERNELS.items()
  }
  for name, (_, channels) in KERNELS.items():  # one magnitude per tensor or per channel
    mags = np.abs(np.asarray(getattr(model, name).kernel.get_value())).reshape(-1, channels)
    np.testing.assert_array_equal(mags.max(0), mags.min(0))
    assert len(np.unique(mags)) == (channels if per_channel else 1)
  assert s.full_precision == () and "Full precision" not in printed[0]
  assert s.binary_params == 996 and s.float_params == 38


def test_summary_names_the_kernels_kept_in_full_precision():
  model = train_with_lab(per_channel=False, steps=1)
  # 0.3 alpha is on no level set (0.5 alpha would be: 3-bit logarithmic levels).
  model.linear1.kernel.set_value(model.linear1.kernel.get_value().at[0, 0].multiply(0.3))
  model.conv1.kernel.set_value(model.conv1.kernel.get_value().at[0, 0, 0, 0].set(jnp.nan))
  printed = []
  s = lab_optax.summary(model, print_fn=printed.append)
  assert s.full_precision == ("conv1/kernel", "linear1/kernel")
  assert [layer.full_precision for layer in s.layers] == [
    ("conv1/kernel",),
    (),
    ("linear1/kernel",),
    (),
  ]
  assert s.binary_params == 288 + 160 and s.alphas == 2 and s.float_params == 38 + 36 + 512
  assert printed[0].splitlines()[-1] == "Full precision kernels: conv1/kernel, linear1/kernel"
  # A binary layer's kernel counts as 1-bit before it is binarized: the layer binarizes it.
  s = lab_optax.summary(Net(nnx.Rngs(0)), print_fn=None)
  assert s.full_precision == ("out/kernel",) and s.binary_params == 6400


def train_with(tx, steps=2):
  """A PlainCNN trained with a lab_optax optimizer's default mask: every kernel is quantized."""
  model = PlainCNN(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  lab_optax.nnx.binarize_model(model, optimizer)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  labels = jnp.arange(16) % 10

  @nnx.jit
  def step(model, optimizer):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(steps):
    step(model, optimizer)
  return model


@pytest.mark.parametrize(
  "tx, bits, scales",
  [
    # Ternary by default in test_summary_of_a_ternary_layer_counts_what_its_quantizer_makes.
    pytest.param(lab_optax.lat(1e-2), 2, 1, marks=pytest.mark.slow),
    pytest.param(lab_optax.lat(1e-2, scales=2), 2, 2, marks=pytest.mark.slow),
    (lab_optax.twn(1e-2, per_channel=True), 2, "channels"),
    pytest.param(lab_optax.laq(1e-2), 3, 1, marks=pytest.mark.slow),
    (lab_optax.laq(1e-2, bits=4, levels="log"), 4, 1),
  ],
)
def test_summary_recognizes_ternary_and_mbit_kernels_by_their_values(tx, bits, scales):
  model = train_with(tx)
  printed = []
  s = lab_optax.summary(model, print_fn=printed.append)
  size = sum(n for n, _ in KERNELS.values())
  assert s.binary_params == 0 and s.low_bit_params == ((bits, size),)
  assert s.full_precision == () and s.float_params == 38 and s.not_packed == ()
  alphas = sum(c for _, c in KERNELS.values()) if scales == "channels" else scales * 4
  assert s.alphas == alphas
  kernels = [np.asarray(getattr(model, name).kernel.get_value()) for name in KERNELS]
  zeros = sum(int((k == 0).sum()) for k in kernels)
  assert s.zeros == zeros and s.zero_fraction == pytest.approx(zeros / size)
  assert s.bits_per_weight == bits
  assert s.binary_bytes == bits * size / 8 + 4 * (alphas + 38)
  text = printed[0]
  assert f"{bits}-bit params" in text and "zeros" in text and "Quantized kernels" not in text
  # Packed, the model counts the same.
  packed = lab_optax.summary(lab_optax.nnx.pack_model(nnx.clone(model)), print_fn=None)
  assert (packed.low_bit_params, packed.alphas, packed.zeros) == (s.low_bit_params, alphas, zeros)


def test_summary_of_a_ternary_layer_counts_what_its_quantizer_makes():
  layer = BinaryLinear(100, 8, kernel_quantizer="lat", rngs=nnx.Rngs(0))
  s = lab_optax.summary(layer, print_fn=None)
  ternary = lab_optax.quantize_ste(layer.kernel.get_value(), layer.kernel_quantizer)
  assert s.low_bit_params == ((2, 800),) and s.binary_params == 0 and s.alphas == 1
  assert s.zeros == int((np.asarray(ternary) == 0).sum()) > 0
  assert s.not_packed == () and s.full_precision == ()
  # A mixed model: the 1-bit, 2-bit and 32-bit columns side by side.
  net = Net(nnx.Rngs(0))
  net.out = BinaryLinear(64, 10, kernel_quantizer="laq", rngs=nnx.Rngs(0))
  s = lab_optax.summary(net, print_fn=None)
  assert s.binary_params == 6400 and s.low_bit_params == ((3, 640),)
  assert s.quantized_params == 7040
  assert s.bits_per_weight == pytest.approx((6400 + 3 * 640) / 7040)
  header = s.table().splitlines()[0]
  assert header.index("1-bit") < header.index("3-bit") < header.index("32-bit")
  # A plain summary keeps its former columns.
  assert "zeros" not in lab_optax.summary(Net(nnx.Rngs(0)), print_fn=None).table()

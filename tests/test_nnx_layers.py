"""Binary NNX layers against the plain Flax layers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lab_optax
from lab_optax.nnx import BinaryConv, BinaryLinear, BinaryLSTMCell, BinaryParam


def bwn(kernel):
  k = np.asarray(kernel, np.float32)
  return np.mean(np.abs(k)) * np.where(k >= 0, 1.0, -1.0)


@pytest.mark.parametrize("param_dtype, dtype", [(jnp.float32, None), (jnp.bfloat16, jnp.bfloat16)])
def test_shapes_and_dtypes_match_flax(param_dtype, dtype):
  kw = dict(param_dtype=param_dtype, dtype=dtype)
  pairs = [
    (nnx.Linear(6, 4, rngs=nnx.Rngs(0), **kw), BinaryLinear(6, 4, rngs=nnx.Rngs(0), **kw), (3, 6)),
    (
      nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0), **kw),
      BinaryConv(3, 5, (3, 3), rngs=nnx.Rngs(0), **kw),
      (2, 8, 8, 3),
    ),
  ]
  for plain, binary, shape in pairs:
    x = jnp.ones(shape, param_dtype)
    assert jax.tree.map(jnp.shape, nnx.state(plain)) == jax.tree.map(jnp.shape, nnx.state(binary))
    assert binary.kernel.get_value().dtype == param_dtype
    y_plain, y_binary = plain(x), binary(x)
    assert y_plain.shape == y_binary.shape and y_plain.dtype == y_binary.dtype
  cell = BinaryLSTMCell(6, 4, rngs=nnx.Rngs(0), **kw)
  plain_cell = nnx.LSTMCell(6, 4, rngs=nnx.Rngs(0), **kw)
  assert jax.tree.map(jnp.shape, nnx.state(cell)) == jax.tree.map(jnp.shape, nnx.state(plain_cell))
  carry = cell.initialize_carry((3, 6), nnx.Rngs(1))
  (c, h), y = cell(carry, jnp.ones((3, 6), param_dtype))
  (pc, ph), py = plain_cell(carry, jnp.ones((3, 6), param_dtype))
  assert y.shape == py.shape and y.dtype == py.dtype and c.dtype == pc.dtype


def test_full_precision_mode_equals_flax_linear_and_conv():
  x = jax.random.normal(jax.random.key(0), (4, 6))
  plain = nnx.Linear(6, 3, rngs=nnx.Rngs(1))
  layer = BinaryLinear(6, 3, binarize_kernel=False, rngs=nnx.Rngs(2))
  assert type(layer.kernel) is nnx.Param
  nnx.update(layer, nnx.state(plain))
  np.testing.assert_array_equal(layer(x), plain(x))

  xc = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  plain_conv = nnx.Conv(3, 4, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(1))
  conv = BinaryConv(
    3, 4, (3, 3), strides=2, padding="VALID", binarize_kernel=False, rngs=nnx.Rngs(2)
  )
  nnx.update(conv, nnx.state(plain_conv))
  np.testing.assert_array_equal(conv(xc), plain_conv(xc))


def test_full_precision_lstm_cell_equals_flax_lstm_cell():
  plain = nnx.LSTMCell(5, 7, rngs=nnx.Rngs(1))
  cell = BinaryLSTMCell(5, 7, binarize_kernel=False, rngs=nnx.Rngs(2))
  nnx.update(cell, nnx.state(plain))
  carry = plain.initialize_carry((3, 5), nnx.Rngs(3))
  carry = (carry[0] + 0.3, carry[1] - 0.2)
  x = jax.random.normal(jax.random.key(0), (3, 5))
  (c1, h1), y1 = cell(carry, x)
  (c2, h2), y2 = plain(carry, x)
  np.testing.assert_allclose(c1, c2, rtol=1e-6)
  np.testing.assert_allclose(y1, y2, rtol=1e-6)


def test_binary_layers_use_bwn_for_full_precision_kernels_and_keep_binary_ones():
  x = jax.random.normal(jax.random.key(0), (4, 6))
  layer = BinaryLinear(6, 3, rngs=nnx.Rngs(1))
  kernel = layer.kernel.get_value()
  expected = x @ bwn(kernel) + layer.bias.get_value()
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
  # A kernel already on the binary set (per tensor or per channel) is kept as is.
  for binary in (
    0.37 * np.sign(np.asarray(kernel) + 1e-9),
    np.array([0.1, 0.2, 0.3]) * np.sign(np.asarray(kernel) + 1e-9),
  ):
    layer.kernel.set_value(jnp.asarray(binary, jnp.float32))
    np.testing.assert_allclose(layer(x), x @ binary + layer.bias.get_value(), rtol=1e-5, atol=1e-6)

  xc = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  conv = BinaryConv(3, 4, (3, 3), rngs=nnx.Rngs(1))
  reference = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(1))
  reference.kernel.set_value(jnp.asarray(bwn(conv.kernel.get_value()), jnp.float32))
  np.testing.assert_allclose(conv(xc), reference(xc), rtol=1e-5, atol=1e-5)


def test_binarized_inputs_use_sign_with_the_ste_gate():
  layer = BinaryLinear(3, 2, binarize_inputs=True, rngs=nnx.Rngs(0))
  x = jnp.array([[-2.0, 0.0, 0.5]])
  k = bwn(layer.kernel.get_value())
  np.testing.assert_allclose(layer(x), np.array([[-1.0, 1.0, 1.0]]) @ k, rtol=1e-6)
  gx = jax.grad(lambda x: layer(x).sum())(x)
  np.testing.assert_allclose(gx[0, 0], 0.0)  # |x| > 1: gated
  np.testing.assert_allclose(gx[0, 1:], k.sum(axis=1)[1:], rtol=1e-6)


def test_lstm_cell_holds_eight_binarized_matrices_with_the_papers_init():
  cell = BinaryLSTMCell(5, 7, rngs=nnx.Rngs(0))
  kernels = nnx.state(cell, BinaryParam)
  leaves = jax.tree.leaves(kernels)
  assert len(leaves) == 8
  shapes = sorted(leaf.shape for leaf in leaves)
  assert shapes == [(5, 7)] * 4 + [(7, 7)] * 4
  assert all(float(jnp.max(jnp.abs(k))) <= 0.08 for k in leaves)
  assert all(float(jnp.max(jnp.abs(k))) > 0.06 for k in leaves)
  np.testing.assert_array_equal(cell.hf.bias.get_value(), np.ones(7))
  for gate in (cell.hi, cell.hg, cell.ho):
    np.testing.assert_array_equal(gate.bias.get_value(), np.zeros(7))
  # Plain params: the 4 biases only.
  plain = nnx.state(cell, nnx.Not(BinaryParam))
  assert sorted(x.shape for x in jax.tree.leaves(plain)) == [(7,)] * 4


def test_dense_and_conv_default_init_is_the_papers():
  layer = BinaryLinear(300, 100, rngs=nnx.Rngs(0))
  bound = np.sqrt(1.5 / 400)
  k = np.asarray(layer.kernel.get_value())
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
  conv = BinaryConv(16, 32, (3, 3), rngs=nnx.Rngs(0))
  bound = np.sqrt(1.5 / (9 * 16 + 9 * 32))
  k = np.asarray(conv.kernel.get_value())
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound


def test_binary_lstm_runs_in_nnx_rnn_and_binarizes_only_the_output_nonlinearity():
  cell = BinaryLSTMCell(4, 6, binary_activation=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  rnn = nnx.RNN(cell, return_carry=True)
  (c, h), ys = rnn(x)
  assert ys.shape == (2, 5, 6)
  # One step by hand: h = o * sign(c), o = sigmoid(...) in (0, 1).
  carry = cell.initialize_carry((2, 4), nnx.Rngs(0))
  (c1, h1), _ = cell(carry, x[:, 0])
  o = jax.nn.sigmoid(cell.io(x[:, 0]) + cell.ho(carry[1]))
  np.testing.assert_allclose(h1, o * np.where(np.asarray(c1) >= 0, 1.0, -1.0), rtol=1e-6)
  np.testing.assert_allclose(ys[:, 0], h1, rtol=1e-6)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = BinaryLinear(6, 32, rngs=rngs)
    self.l2 = BinaryLinear(32, 32, binarize_inputs=True, rngs=rngs)
    self.out = BinaryLinear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.l2(self.l1(x))))


def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(128, 6)), jnp.float32)
  return x, jnp.sin(x[:, :1]) + x[:, 1:2]


def test_lab_through_nnx_optimizer_lowers_the_loss_and_keeps_kernels_binary():
  model = MLP(nnx.Rngs(0))
  tx = lab_optax.lab(3e-3, mask=lab_optax.nnx.binary_mask(model))
  x, y = data()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  lab_optax.nnx.binarize_model(model, optimizer)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  for _ in range(100):
    losses.append(float(step(model, optimizer)))
    alphas = optax.tree.get(nnx.as_pure(optimizer.opt_state), "alpha")
    for name in ("l1", "l2", "out"):
      k = np.asarray(getattr(model, name).kernel.get_value())
      alpha = float(alphas[name]["kernel"])
      np.testing.assert_array_equal(np.abs(k), alpha)
  assert losses[-1] < 0.5 * losses[0]
  # The forward pass uses the binarized params unchanged, with the optimizer's alpha.
  k = model.l1.kernel.get_value()
  np.testing.assert_array_equal(lab_optax.binarize_ste(k), k)
  np.testing.assert_array_equal(model.l1(x), x @ k + model.l1.bias.get_value())


def test_plain_adam_trains_the_same_network_as_bwn():
  model = MLP(nnx.Rngs(0))
  x, y = data()
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(100)]
  assert losses[-1] < 0.5 * losses[0]
  # The params stay full precision (they are the latent weights) ...
  k = np.asarray(model.l1.kernel.get_value())
  assert len(np.unique(np.abs(k))) > 10
  # ... and the forward pass is BWN: mean|w| * sign(w).
  h = x @ bwn(k) + model.l1.bias.get_value()
  np.testing.assert_allclose(model.l1(x), h, rtol=1e-5, atol=1e-5)


def test_binary_layers_jit_and_compare_equal_graphdefs():
  a, b = BinaryLinear(3, 2, rngs=nnx.Rngs(0)), BinaryLinear(3, 2, rngs=nnx.Rngs(1))
  assert nnx.graphdef(a) == nnx.graphdef(b)
  x = jnp.ones((1, 3))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(a, x), a(x), rtol=1e-6)


def test_binary_conv_with_a_mask_binarizes_only_the_taps_it_keeps():
  mask = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0).at[0, 0].set(1.0)
  layer = BinaryConv(1, 1, (3, 3), use_bias=False, padding="VALID", mask=mask, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 1))
  # Binarized (as by lab_optax's optimizers): the kept taps are +-0.5, masked ones are ignored.
  layer.kernel.set_value(jnp.full((3, 3, 1, 1), -0.5).at[1, 1].set(0.5))
  expected = 0.5 * x[:, 1, 1, 0] - 0.5 * x[:, 0, 0, 0]
  np.testing.assert_allclose(layer(x)[:, 0, 0, 0], expected, rtol=1e-6)
  # Not binarized: BWN over the kept taps only, the masked taps contribute nothing.
  layer.kernel.set_value(jnp.full((3, 3, 1, 1), 9.0).at[1, 1].set(0.2).at[0, 0].set(-0.4))
  expected = 0.3 * x[:, 1, 1, 0] - 0.3 * x[:, 0, 0, 0]
  np.testing.assert_allclose(layer(x)[:, 0, 0, 0], expected, rtol=1e-6)
  grads = nnx.grad(lambda m: m(x).sum())(layer)
  np.testing.assert_array_equal(np.asarray(grads["kernel"][...]) != 0, np.asarray(mask) != 0)

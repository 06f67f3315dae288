"""Binary NNX layers against the plain Flax layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lab_optax
from lab_optax import projections
from lab_optax.nnx import BinaryConv, BinaryLinear, BinaryLSTMCell, BinaryParam


def bwn(kernel):
  k = np.asarray(kernel, np.float32)
  return np.mean(np.abs(k)) * np.where(k >= 0, 1.0, -1.0)


# bfloat16 params and computation by default; float32 with -m slow.
@pytest.mark.parametrize(
  "param_dtype, dtype",
  [pytest.param(jnp.float32, None, marks=pytest.mark.slow), (jnp.bfloat16, jnp.bfloat16)],
)
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


# Quantizers beyond binary: kernel_quantizer and input_quantizer.


def _levels(kernel):
  return set(np.unique(np.asarray(kernel)).tolist())


def _train(model, tx, steps=4, mark=False):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if mark:
    lab_optax.nnx.binarize_model(model, optimizer)
  x = jax.random.normal(jax.random.key(1), (8, model.in_features))
  target = jax.random.normal(jax.random.key(2), (8, model.out_features))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return x, losses


@pytest.mark.parametrize("mark", [False, True])
def test_ternary_layer_trained_with_lat_keeps_three_values_and_uses_them_as_they_are(mark):
  layer = BinaryLinear(16, 8, kernel_quantizer="lat", rngs=nnx.Rngs(0))
  x, _ = _train(layer, lab_optax.lat(0.05), mark=mark)
  kernel = layer.kernel.get_value()
  values = _levels(kernel)
  assert len(values) == 3 and 0.0 in values
  # The forward pass uses the kernel as it is: the plain product, bit for bit.
  np.testing.assert_array_equal(layer(x), x @ kernel + layer.bias.get_value())
  assert layer.dot_general.kernel_binarized is mark


def test_binarize_model_makes_a_binary_layer_trained_with_lat_ternary():
  # A default (binary) layer must not re-binarize the ternary kernel that lat keeps.
  layer = BinaryLinear(16, 8, rngs=nnx.Rngs(0))
  x, _ = _train(layer, lab_optax.lat(0.05), mark=True)
  assert layer.kernel_quantizer == projections.TernaryProjection("approximate", rounds=0)  # lat's
  kernel = layer.kernel.get_value()
  assert len(_levels(kernel)) == 3
  np.testing.assert_array_equal(layer(x), x @ kernel + layer.bias.get_value())


@pytest.mark.parametrize(
  "quantizer, tx, count",
  [
    ("laq", lab_optax.laq(0.05), 7),
    pytest.param(
      projections.MbitProjection(3, "log"),
      lab_optax.laq(0.05, levels="log"),
      7,
      marks=pytest.mark.slow,
    ),
    (projections.TernaryProjection(scales=2), lab_optax.lat(0.05, scales=2), 3),
    pytest.param("twn", lab_optax.twn(0.05), 3, marks=pytest.mark.slow),
    ("absmean_ternary", lab_optax.absmean_ternary(0.05), 3),
  ],
)
def test_low_bit_layers_use_the_kernels_their_optimizers_keep(quantizer, tx, count):
  layer = BinaryLinear(64, 8, kernel_quantizer=quantizer, rngs=nnx.Rngs(0))
  x, _ = _train(layer, tx)
  kernel = layer.kernel.get_value()
  assert 3 <= len(_levels(kernel)) <= count
  assert bool(lab_optax._src.ste.on_level_set(kernel, layer.kernel_quantizer))
  np.testing.assert_array_equal(layer(x), x @ kernel + layer.bias.get_value())


def test_ternary_layer_with_adam_trains_by_straight_through_estimator():
  layer = BinaryLinear(16, 8, kernel_quantizer="lat", rngs=nnx.Rngs(0))
  x, losses = _train(layer, optax.adam(0.02), steps=15)
  kernel = layer.kernel.get_value()
  assert len(_levels(kernel)) > 3  # latent weights: adam keeps full precision
  ternary = lab_optax.quantize_ste(kernel, projections.TernaryProjection())
  assert len(_levels(ternary)) == 3
  np.testing.assert_allclose(layer(x), x @ ternary + layer.bias.get_value(), rtol=1e-6)
  # The gradient with respect to the kernel is the one with respect to the ternary kernel.
  g = jax.grad(lambda k: jnp.sum(jnp.sin(x @ lab_optax.quantize_ste(k, layer.kernel_quantizer))))
  g_ref = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k)))(ternary)
  np.testing.assert_allclose(g(kernel), g_ref, rtol=1e-6)
  assert losses[-1] < losses[0]


def test_a_ternary_kernel_is_never_rebinarized_by_a_ternary_layer():
  layer = BinaryLinear(4, 3, kernel_quantizer="lat", rngs=nnx.Rngs(0))
  kernel = jnp.array([[0.5, 0.0, -0.5], [0.0, 0.0, 0.5], [-0.5, 0.5, 0.0], [0.5, 0.5, 0.5]])
  layer.kernel.set_value(kernel)
  x = jax.random.normal(jax.random.key(0), (2, 4))
  np.testing.assert_array_equal(layer(x), x @ kernel + layer.bias.get_value())
  # Per-channel scales are kept too.
  per_channel = kernel * jnp.array([1.0, 2.0, 0.25])
  layer.kernel.set_value(per_channel)
  np.testing.assert_array_equal(layer(x), x @ per_channel + layer.bias.get_value())


def test_quantizer_arguments_and_backward_compatibility():
  rngs = nnx.Rngs(0)
  graph = nnx.graphdef
  assert graph(BinaryLinear(3, 2, rngs=nnx.Rngs(0))) == graph(
    BinaryLinear(3, 2, kernel_quantizer="bwn", rngs=nnx.Rngs(0))
  )
  assert graph(BinaryLinear(3, 2, binarize_inputs=True, rngs=nnx.Rngs(0))) == graph(
    BinaryLinear(3, 2, input_quantizer="ste_sign", rngs=nnx.Rngs(0))
  )
  assert graph(BinaryLinear(3, 2, binarize_kernel=False, rngs=nnx.Rngs(0))) == graph(
    BinaryLinear(3, 2, kernel_quantizer=None, rngs=nnx.Rngs(0))
  )
  # Projections compare by value: layers built alike have equal graphdefs.
  a = BinaryLinear(
    3, 2, kernel_quantizer=projections.TernaryProjection("approximate", rounds=0), rngs=nnx.Rngs(0)
  )
  b = BinaryLinear(3, 2, kernel_quantizer="lat", rngs=nnx.Rngs(0))
  assert graph(a) == graph(b)
  assert type(BinaryLinear(3, 2, kernel_quantizer=None, rngs=rngs).kernel) is nnx.Param
  with pytest.raises(ValueError, match="unknown kernel_quantizer"):
    BinaryLinear(3, 2, kernel_quantizer="ternary!", rngs=rngs)
  with pytest.raises(ValueError, match="binarize_kernel=False"):
    BinaryLinear(3, 2, binarize_kernel=False, kernel_quantizer="lat", rngs=rngs)
  with pytest.raises(ValueError, match="binarize_inputs=True"):
    BinaryLinear(3, 2, binarize_inputs=True, input_quantizer=jnp.tanh, rngs=rngs)
  with pytest.raises(ValueError, match="unknown input_quantizer"):
    BinaryConv(3, 2, (3, 3), input_quantizer="sign", rngs=rngs)
  with pytest.raises(TypeError, match="kernel_quantizer"):
    BinaryConv(3, 2, (3, 3), kernel_quantizer=3, rngs=rngs)


def test_callable_quantizers_are_used_as_they_are():
  layer = BinaryLinear(
    4, 3, kernel_quantizer=jnp.round, input_quantizer=jnp.abs, use_bias=False, rngs=nnx.Rngs(0)
  )
  layer.kernel.set_value(jnp.array([[0.4, 1.6, -2.2]] * 4))
  x = jnp.array([[-1.0, 2.0, -3.0, 4.0]])
  np.testing.assert_array_equal(layer(x), jnp.abs(x) @ jnp.round(layer.kernel.get_value()))


def test_masked_ternary_conv_keeps_masked_taps_zero():
  mask = jnp.ones((3, 3, 2, 4)).at[0].set(0.0)
  conv = BinaryConv(2, 4, (3, 3), kernel_quantizer="lat", mask=mask, rngs=nnx.Rngs(0))
  seen = []

  def op(lhs, rhs, *args, **kwargs):
    seen.append(rhs)
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  conv.conv_general_dilated = dataclasses.replace(conv.conv_general_dilated, op=op)
  conv(jnp.ones((1, 5, 5, 2)))
  used = seen[0]
  assert len(_levels(used)) == 3 and bool(jnp.all(used[0] == 0))


def test_ternary_lstm_cell_quantizes_its_eight_matrices():
  cell = BinaryLSTMCell(5, 4, kernel_quantizer="lat", rngs=nnx.Rngs(0))
  gates = [cell.ii, cell.if_, cell.ig, cell.io, cell.hi, cell.hf, cell.hg, cell.ho]
  ternary = lab_optax.nnx.layers.KERNEL_QUANTIZERS["lat"]
  assert all(g.kernel_quantizer == ternary for g in gates)
  carry = cell.initialize_carry((2, 5), nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, 5))
  for g in gates:  # put the kernels on the ternary levels: the cell then uses them as they are
    g.kernel.set_value(lab_optax.quantize_ste(g.kernel.get_value(), g.kernel_quantizer))
  (c, h), y = cell(carry, x)
  ref = nnx.LSTMCell(5, 4, rngs=nnx.Rngs(0))
  for name in ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho"):
    getattr(ref, name).kernel.set_value(getattr(cell, name).kernel.get_value())
    if getattr(cell, name).bias is not None:
      getattr(ref, name).bias.set_value(getattr(cell, name).bias.get_value())
  (_, _), y_ref = ref(carry, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)

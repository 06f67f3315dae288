"""binary_mask and binarize_model."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import grid
from flax import nnx
from test_nnx_summary import PlainCNN, train_with_lab

import lab_optax
from lab_optax.nnx import (
  BinaryConv,
  BinaryLinear,
  BinaryParam,
  binarize_model,
  binary_mask,
  fold_batch_norm,
  pack_model,
  unpack_model,
)


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = BinaryConv(3, 4, (3, 3), rngs=rngs)
    self.fp = BinaryLinear(4, 4, binarize_kernel=False, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)


def test_binary_mask_selects_binary_params_for_pure_and_variable_states():
  model = Net(nnx.Rngs(0))
  mask = binary_mask(model)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat == {
    "['conv']['bias']": False,
    "['conv']['kernel']": True,
    "['fp']['bias']": False,
    "['fp']['kernel']": False,
    "['out']['bias']": False,
    "['out']['kernel']": False,
  }
  tx = lab_optax.lab(0.1, mask=mask)
  for params in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
    latent = optax.tree.get(tx.init(params), "latent")
    binarized = [
      jax.tree_util.keystr(k)
      for k, v in jax.tree_util.tree_leaves_with_path(
        latent, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
      if not isinstance(v, optax.MaskedNode)
    ]
    assert [b.replace(".value", "") for b in binarized] == ["['conv']['kernel']"]


def test_binarize_model_applies_the_first_projection():
  model = Net(nnx.Rngs(0))
  kernel = np.asarray(model.conv.kernel.get_value())
  for tx, alpha in (
    (lab_optax.lab(0.1, mask=binary_mask(model)), np.mean(np.abs(kernel))),
    (lab_optax.binary_connect(0.1, mask=binary_mask(model)), 1.0),
  ):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    binarize_model(model, optimizer)
    np.testing.assert_allclose(
      model.conv.kernel.get_value(), alpha * np.where(kernel >= 0, 1.0, -1.0), rtol=1e-6
    )
    np.testing.assert_array_equal(
      optax.tree.get(nnx.as_pure(optimizer.opt_state), "latent")["conv"]["kernel"], kernel
    )
    assert len(np.unique(np.asarray(model.fp.kernel.get_value()))) > 2


def binarized(model):
  """Puts every binary kernel of model on the binary set, as a lab_optax optimizer would."""
  for _, module in nnx.iter_modules(model):
    for value in vars(module).values():
      if isinstance(value, lab_optax.nnx.BinaryParam):
        value.set_value(lab_optax.binarize_ste(value.get_value()))
  return model


class Deep(nnx.Module):
  def __init__(self, binary_inputs, rngs):
    self.conv1 = BinaryConv(3, 8, (3, 3), rngs=rngs)
    self.conv2 = BinaryConv(8, 8, (3, 3), strides=2, binarize_inputs=binary_inputs, rngs=rngs)
    self.dense = BinaryLinear(4 * 4 * 8, 70, binarize_inputs=binary_inputs, rngs=rngs)
    self.cell = lab_optax.nnx.BinaryLSTMCell(70, 12, binary_activation=binary_inputs, rngs=rngs)

  def __call__(self, x):
    x = self.conv2(jax.nn.tanh(self.conv1(x)))
    x = self.dense(jax.nn.tanh(x).reshape(x.shape[0], -1))
    carry = self.cell.initialize_carry(x.shape, nnx.Rngs(0))
    (_, h), _ = self.cell(carry, x)
    (_, h), _ = self.cell((h, h), x)
    return h


# Binary inputs (XNOR) by default; test_xnor_path_is_exact_on_integers and the
# folded MLP's test cover that path too.
@pytest.mark.parametrize("binary_inputs", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_inference_equals_float_inference(binary_inputs, tmp_path):
  model = binarized(Deep(binary_inputs, nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 3))
  # Compiled once per structure (float, packed); the packed model runs eagerly once.
  apply = jax.jit(lambda m, x: m(x))
  expected = apply(model, x)
  before = lab_optax.summary(model, print_fn=None)
  lab_optax.nnx.pack_model(model)
  kernels = jax.tree.leaves(
    nnx.state(model, lab_optax.nnx.BinaryParam),
    is_leaf=lambda v: isinstance(v, lab_optax.PackedBinary),
  )
  assert len(kernels) == 11 and all(isinstance(k, lab_optax.PackedBinary) for k in kernels)
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(apply(model, x), expected, rtol=1e-5, atol=1e-5)
  after = lab_optax.summary(model, print_fn=None)
  assert (after.binary_params, after.alphas, after.float_params) == (
    before.binary_params,
    before.alphas,
    before.float_params,
  )
  # The packed network in one file, loaded into a fresh model of the same shape.
  path = tmp_path / "model.npz"
  lab_optax.save_packed(path, nnx.state(model))
  fresh = Deep(binary_inputs, nnx.Rngs(42))
  nnx.update(fresh, lab_optax.load_packed(path))
  np.testing.assert_array_equal(apply(fresh, x), apply(model, x))
  # Unpacking gives the float kernels back bit for bit.
  lab_optax.nnx.unpack_model(model)
  np.testing.assert_array_equal(apply(model, x), expected)


def test_xnor_path_is_exact_on_integers():
  for layer, x, dims in (
    (BinaryLinear(100, 7, use_bias=False, binarize_inputs=True, rngs=nnx.Rngs(0)), (6, 100), None),
    (
      BinaryConv(5, 4, (3, 3), use_bias=False, binarize_inputs=True, rngs=nnx.Rngs(0)),
      (2, 6, 6, 5),
      ("NHWC", "HWIO", "NHWC"),
    ),
  ):
    binarized(layer)
    kernel = layer.kernel.get_value()
    alpha = np.float32(np.abs(np.asarray(kernel)).max())
    signs = np.where(np.asarray(kernel) >= 0, 1.0, -1.0)
    inputs = jax.random.normal(jax.random.key(2), x)
    xs = np.where(np.asarray(inputs) >= 0, 1.0, -1.0)
    if dims is None:
      integer = xs @ signs
    else:
      integer = np.asarray(
        jax.lax.conv_general_dilated(
          xs, signs, (1, 1), "SAME", dimension_numbers=dims, precision="highest"
        )
      )
    lab_optax.nnx.pack_model(layer)
    out = np.asarray(nnx.jit(lambda m, x: m(x))(layer, inputs))  # eager: packed_inference_*
    np.testing.assert_array_equal(out, (alpha * integer.astype(np.float32)).astype(np.float32))


def test_pack_model_refuses_a_kernel_that_is_not_binarized():
  layer = BinaryLinear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="kernel"):
    lab_optax.nnx.pack_model(layer)


def trained_norm(features, key, **kwargs):
  """A batch norm in inference mode with running statistics that are not the defaults."""
  norm = nnx.BatchNorm(features, use_running_average=True, rngs=nnx.Rngs(0), **kwargs)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  norm.mean.set_value(jax.random.normal(k1, (features,)))
  norm.var.set_value(jax.random.uniform(k2, (features,), minval=0.1, maxval=3.0))
  if norm.scale is not None:
    # Negative scales too: the folded layer's signs flip in those channels.
    norm.scale.set_value(jax.random.normal(k3, (features,)))
  if norm.bias is not None:
    norm.bias.set_value(jax.random.normal(k4, (features,)))
  return norm


@pytest.mark.parametrize(
  "kind, binarize_inputs, use_bias",
  grid(
    ["linear", "conv"],
    [False, True],
    [False, True],
    fast=[("linear", False, True), ("conv", True, False), ("conv", False, True)],
  ),
)
def test_fold_batch_norm_computes_norm_of_layer(kind, binarize_inputs, use_bias):
  if kind == "linear":
    layer = BinaryLinear(
      40, 6, use_bias=use_bias, binarize_inputs=binarize_inputs, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (5, 40))
  else:
    layer = BinaryConv(
      3, 6, (3, 3), use_bias=use_bias, binarize_inputs=binarize_inputs, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  if use_bias:
    layer.bias.set_value(jax.random.normal(jax.random.key(3), (6,)))
  binarized(layer)
  norm = trained_norm(6, jax.random.key(2))
  expected = norm(layer(x))
  folded = lab_optax.nnx.fold_batch_norm(layer, norm)
  np.testing.assert_allclose(folded(x), expected, rtol=1e-5, atol=1e-5)
  # The inputs are unchanged, the folded kernel holds one magnitude per channel.
  np.testing.assert_array_equal(norm(layer(x)), expected)
  kernel = np.asarray(folded.kernel.get_value()).reshape(-1, 6)
  assert isinstance(folded.kernel, lab_optax.nnx.BinaryParam)
  np.testing.assert_array_equal(np.abs(kernel).max(0), np.abs(kernel).min(0))
  # Packed: 1 bit per weight and two floats per channel, same outputs.
  lab_optax.nnx.pack_model(folded)
  packed = folded.kernel.get_value()
  assert packed.alpha.shape == (6,)
  np.testing.assert_allclose(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_binarizes_a_latent_kernel_as_the_forward_pass_does():
  layer = BinaryLinear(16, 4, use_bias=False, rngs=nnx.Rngs(0))  # kernel not binarized
  norm = trained_norm(4, jax.random.key(0), use_scale=False, use_bias=False)
  x = jax.random.normal(jax.random.key(1), (3, 16))
  folded = lab_optax.nnx.fold_batch_norm(layer, norm)
  np.testing.assert_allclose(folded(x), norm(layer(x)), rtol=1e-5, atol=1e-5)
  full = BinaryLinear(16, 4, binarize_kernel=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    lab_optax.nnx.fold_batch_norm(full, norm)(x), norm(full(x)), rtol=1e-5, atol=1e-5
  )


def test_fold_batch_norm_refuses_what_it_cannot_fold():
  layer = binarized(BinaryLinear(8, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="BinaryLinear or BinaryConv"):
    lab_optax.nnx.fold_batch_norm(
      nnx.Linear(8, 4, rngs=nnx.Rngs(0)), trained_norm(4, jax.random.key(0))
    )
  with pytest.raises(TypeError, match="nnx.BatchNorm"):
    lab_optax.nnx.fold_batch_norm(layer, nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="5 features, the BinaryLinear 4"):
    lab_optax.nnx.fold_batch_norm(layer, trained_norm(5, jax.random.key(0)))
  with pytest.raises(ValueError, match="axis 0"):
    lab_optax.nnx.fold_batch_norm(layer, trained_norm(4, jax.random.key(0), axis=0))
  lab_optax.nnx.pack_model(layer)
  with pytest.raises(ValueError, match="packed"):
    lab_optax.nnx.fold_batch_norm(layer, trained_norm(4, jax.random.key(0)))


def test_folded_mlp_packs_to_one_file_and_matches_the_float_model(tmp_path):
  from lab_optax.experiments.models import METHODS, MLP

  def build(method):
    return MLP(20, 3, hidden=64, depth=2, method=METHODS[method], rngs=nnx.Rngs(0))

  for method in ("lab", "lab2"):
    model = binarized(build(method))
    for i, norm in enumerate(model.norms):
      trained = trained_norm(norm.num_features, jax.random.key(i))
      nnx.update(norm, nnx.state(trained))
    model.eval()
    x = jax.random.normal(jax.random.key(9), (7, 20))
    apply = nnx.jit(lambda m, x: m(x))  # one compilation per structure
    expected = apply(model, x)
    model.fold_batch_norm()
    assert list(model.norms) == [None] * 3
    np.testing.assert_allclose(apply(model, x), expected, rtol=1e-4, atol=1e-4)
    lab_optax.nnx.pack_model(model)
    path = tmp_path / f"{method}.npz"
    lab_optax.save_packed(path, nnx.state(model))
    fresh = build(method).fold_batch_norm()
    nnx.update(fresh, lab_optax.load_packed(path))
    fresh.eval()
    packed_out = apply(model, x)
    np.testing.assert_array_equal(apply(fresh, x), packed_out)
    np.testing.assert_allclose(packed_out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)  # eagerly


def test_fold_batch_norm_refuses_one_weight_per_channel():
  layer = binarized(BinaryLinear(1, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="one weight per output channel"):
    lab_optax.nnx.fold_batch_norm(layer, trained_norm(4, jax.random.key(0)))


@pytest.mark.parametrize("binarize_inputs", [False, True])
def test_packed_layers_keep_the_float_layers_output_dtype(binarize_inputs):
  for layer, shape in (
    (BinaryLinear(40, 6, binarize_inputs=binarize_inputs, rngs=nnx.Rngs(0)), (3, 40)),
    (BinaryConv(3, 6, (3, 3), binarize_inputs=binarize_inputs, rngs=nnx.Rngs(0)), (2, 5, 5, 3)),
  ):
    binarized(layer)
    for dtype in (jnp.bfloat16, jnp.float32):
      x = jax.random.normal(jax.random.key(1), shape).astype(dtype)
      expected = layer(x)
      packed = lab_optax.nnx.pack_model(nnx.clone(layer))
      assert packed(x).dtype == expected.dtype == jnp.float32
      np.testing.assert_allclose(packed(x), expected, rtol=1e-5, atol=1e-5)


class Mixed(nnx.Module):
  def __init__(self, rngs):
    self.conv = BinaryConv(3, 4, (3, 3), rngs=rngs)
    self.full = BinaryLinear(4, 4, binarize_kernel=False, rngs=rngs)
    self.cell = lab_optax.nnx.BinaryLSTMCell(4, 4, rngs=rngs)
    self.out = BinaryLinear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = jnp.mean(self.conv(x), axis=(1, 2))
    x = self.full(x)
    (_, h), _ = self.cell(self.cell.initialize_carry(x.shape, nnx.Rngs(0)), x)
    return self.out(h)


def test_binarize_model_lets_optimizer_binarized_layers_skip_the_check():
  def build(skip_out):
    model = Mixed(nnx.Rngs(0))
    mask = binary_mask(model)
    if skip_out:
      mask["out"]["kernel"] = False  # trained in full precision by the optimizer
    return model, nnx.Optimizer(model, lab_optax.lab(0.05, mask=mask), wrt=nnx.Param)

  model, optimizer = build(skip_out=True)
  unmarked = nnx.clone(model)
  binarize_model(model, optimizer)
  nnx.update(unmarked, nnx.state(model))  # same values, layers not marked
  ops = {
    "conv": model.conv.conv_general_dilated,
    "full": model.full.dot_general,
    "cell.ii": model.cell.ii.dot_general,
    "cell.hf": model.cell.hf.dot_general,
    "out": model.out.dot_general,
  }
  assert {name: op.kernel_binarized for name, op in ops.items()} == {
    "conv": True,
    "full": False,  # binarize_kernel=False
    "cell.ii": True,
    "cell.hf": True,
    "out": False,  # not binarized by the optimizer: the layer keeps its check
  }
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  # The check is gone from the forward pass of the marked layers only.
  conds = str(jax.make_jaxpr(lambda m: m(x))(model)).count("cond[")
  assert conds == 1 and str(jax.make_jaxpr(lambda m: m(x))(unmarked)).count("cond[") == 10

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  twin, twin_optimizer = build(skip_out=True)
  nnx.update(twin, nnx.state(unmarked))
  for _ in range(5):
    step(model, optimizer)
    step(twin, twin_optimizer)
  # Marking changes the work, not the result.
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(twin))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("per_channel", [pytest.param(False, marks=pytest.mark.slow), True])
def test_pack_model_packs_plain_layers_trained_with_lab(per_channel, tmp_path):
  model = train_with_lab(per_channel)
  layers = {name: getattr(model, name) for name in ("conv1", "conv2", "linear1", "linear2")}
  floats = {name: np.asarray(layer.kernel.get_value()) for name, layer in layers.items()}
  x = jax.random.normal(jax.random.key(2), (5, 8, 8, 1))
  # Compiled once per structure (float, packed); the packed model runs eagerly once.
  apply = nnx.jit(lambda m, x: m(x))
  expected = apply(model, x)
  before = lab_optax.summary(model, print_fn=None)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is left dense: no warning
    assert lab_optax.nnx.pack_model(model) is model
  for name, layer in layers.items():
    assert getattr(model, name) is layer  # converted in place
    assert type(layer) is (BinaryConv if name.startswith("conv") else BinaryLinear)
    assert isinstance(layer.kernel, lab_optax.nnx.BinaryParam)
    packed = layer.kernel.get_value()
    assert isinstance(packed, lab_optax.PackedBinary)
    assert packed.alpha.shape == ((floats[name].shape[-1],) if per_channel else ())
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
  packed_out = apply(model, x)
  np.testing.assert_allclose(packed_out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(apply(nnx.merge(*nnx.split(model)), x), packed_out)
  after = lab_optax.summary(model, print_fn=None)
  assert (after.binary_params, after.alphas, after.float_params, after.full_precision) == (
    before.binary_params,
    before.alphas,
    before.float_params,
    (),
  )
  # One file, loaded into a freshly built plain model: pack_model turns its layers into binary
  # layers around the packed kernels.
  path = tmp_path / "cnn.npz"
  lab_optax.save_packed(path, nnx.state(model))
  fresh = PlainCNN(nnx.Rngs(7))
  nnx.update(fresh, lab_optax.load_packed(path))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lab_optax.nnx.pack_model(fresh)
  assert type(fresh.conv1) is BinaryConv and type(fresh.linear2) is BinaryLinear
  np.testing.assert_array_equal(apply(fresh, x), packed_out)
  # Unpacking gives the float kernels back bit for bit, and the float model's outputs.
  lab_optax.nnx.unpack_model(model)
  for name, layer in layers.items():
    np.testing.assert_array_equal(np.asarray(layer.kernel.get_value()), floats[name])
  np.testing.assert_array_equal(apply(model, x), expected)


class Assorted(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(6, 4, rngs=rngs)
    self.latent = nnx.Linear(6, 4, rngs=rngs)  # not binarized
    self.embed = nnx.Embed(5, 6, rngs=rngs)
    self.masked = nnx.Conv(2, 3, (3, 3), mask=jnp.ones((3, 3, 2, 3)), rngs=rngs)
    self.full = BinaryLinear(4, 4, binarize_kernel=False, binarize_inputs=True, rngs=rngs)
    self.einsum = nnx.Einsum("ab,bc->ac", (6, 4), rngs=rngs)


def test_pack_model_names_the_kernels_it_leaves_dense():
  model = Assorted(nnx.Rngs(0))
  for layer, name in (
    (model.dense, "kernel"),
    (model.embed, "embedding"),
    (model.masked, "kernel"),
    (model.full, "kernel"),
  ):
    variable = getattr(layer, name)
    variable.set_value(lab_optax.binarize_ste(variable.get_value()))
  x = jax.random.normal(jax.random.key(1), (3, 6))
  h = jax.random.normal(jax.random.key(2), (3, 4))
  expected = model.dense(x), model.full(h), model.latent(x)
  with pytest.warns(UserWarning) as record:
    lab_optax.nnx.pack_model(model)
  assert len(record) == 1
  assert str(record[0].message) == (
    "pack_model left 4 kernels in full precision: "
    "einsum/kernel (not quantized), "
    "embed/embedding (no packed inference for nnx.Embed), "
    "latent/kernel (not quantized), "
    "masked/kernel (no packed inference for nnx.Conv with a kernel mask)"
  )
  assert type(model.dense) is BinaryLinear and type(model.latent) is nnx.Linear
  assert type(model.masked) is nnx.Conv and type(model.embed.embedding) is nnx.Param
  # A binary layer in full precision whose kernel is binarized is packed too (XNOR product).
  for layer in (model.dense, model.full):
    assert isinstance(layer.kernel.get_value(), lab_optax.PackedBinary)
  np.testing.assert_allclose(model.dense(x), expected[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.full(h), expected[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(model.latent(x), expected[2])
  assert lab_optax.summary(model, print_fn=None).full_precision == (
    "einsum/kernel",
    "latent/kernel",
  )


def test_pack_model_changes_nothing_when_a_binary_kernel_is_not_binarized():
  class Both(nnx.Module):
    def __init__(self, rngs):
      self.plain = nnx.Linear(4, 3, rngs=rngs)
      self.binary = BinaryLinear(4, 3, rngs=rngs)

  model = Both(nnx.Rngs(0))
  model.plain.kernel.set_value(lab_optax.binarize_ste(model.plain.kernel.get_value()))
  with pytest.raises(ValueError, match="binary.*kernel"):
    lab_optax.nnx.pack_model(model)
  assert type(model.plain) is nnx.Linear and type(model.plain.kernel) is nnx.Param
  assert not isinstance(model.plain.kernel.get_value(), lab_optax.PackedBinary)


# Ternary and m-bit kernels: never packed as binary; batch norms fold into them.


class LowBit(nnx.Module):
  def __init__(self, rngs):
    self.binary = BinaryLinear(64, 16, rngs=rngs)
    self.ternary = BinaryLinear(16, 16, kernel_quantizer="lat", rngs=rngs)
    self.mbit = BinaryLinear(16, 16, kernel_quantizer="laq", rngs=rngs)
    self.plain = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.plain(self.mbit(self.ternary(self.binary(x))))


def test_pack_model_packs_ternary_and_mbit_kernels(tmp_path):
  model = LowBit(nnx.Rngs(0))
  model.binary.kernel.set_value(lab_optax.binarize_ste(model.binary.kernel.get_value()))
  for name in ("ternary", "mbit"):
    layer = getattr(model, name)
    layer.kernel.set_value(lab_optax.quantize_ste(layer.kernel.get_value(), layer.kernel_quantizer))
  # A plain layer with ternary values (as lat leaves it) is recognized too.
  w = model.plain.kernel.get_value()
  model.plain.kernel.set_value(lab_optax.quantize_ste(w, lab_optax.projections.TernaryProjection()))
  x = jax.random.normal(jax.random.key(0), (3, 64))
  y = model(x)
  before = {n: getattr(model, n).kernel.get_value() for n in ("binary", "ternary", "mbit", "plain")}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    pack_model(model)
  assert isinstance(model.binary.kernel.get_value(), lab_optax.PackedBinary)
  bits = {
    n: getattr(model, n).kernel.get_value().bits_per_weight for n in ("ternary", "mbit", "plain")
  }
  assert bits == {"ternary": 2, "mbit": 3, "plain": 2}
  assert type(model.plain) is BinaryLinear and type(model.plain.kernel) is BinaryParam
  assert model.plain.kernel_quantizer == lab_optax.projections.TernaryProjection()
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-6)
  s = lab_optax.summary(model, print_fn=None)
  assert s.not_packed == () and s.full_precision == ()
  assert dict(s.low_bit_params) == {2: 16 * 16 + 16 * 4, 3: 16 * 16}
  # The file holds the planes; a fresh model runs from it once pack_model converts the plain layer.
  path = tmp_path / "low_bit.npz"
  lab_optax.save_packed(path, nnx.state(model))
  fresh = LowBit(nnx.Rngs(1))
  nnx.update(fresh, lab_optax.load_packed(path))
  pack_model(fresh)
  np.testing.assert_allclose(fresh(x), model(x), rtol=1e-6, atol=1e-6)
  unpack_model(model)
  for name, kernel in before.items():
    bitwise = np.asarray(getattr(model, name).kernel.get_value()).view(np.uint32)
    np.testing.assert_array_equal(bitwise, np.asarray(kernel).view(np.uint32))
  np.testing.assert_allclose(model(x), y, rtol=1e-6, atol=1e-6)


def test_pack_model_does_not_pack_a_ternary_kernel_of_a_binary_layer():
  layer = BinaryLinear(16, 4, rngs=nnx.Rngs(0))
  ternary = lab_optax.quantize_ste(
    layer.kernel.get_value(), lab_optax.projections.TernaryProjection()
  )
  layer.kernel.set_value(ternary)
  with pytest.warns(UserWarning, match="kernel \\(ternary, 2 bits per weight"):
    pack_model(layer)
  np.testing.assert_array_equal(layer.kernel.get_value(), ternary)


@pytest.mark.parametrize(
  "quantizer",
  [
    "lat",
    pytest.param(lab_optax.projections.TernaryProjection(scales=2), marks=pytest.mark.slow),
    pytest.param("laq", marks=pytest.mark.slow),
    lab_optax.projections.MbitProjection(3, "log"),
    "twn",
  ],
)
def test_fold_batch_norm_into_ternary_and_mbit_layers(quantizer):
  layer = BinaryLinear(40, 6, kernel_quantizer=quantizer, rngs=nnx.Rngs(0))
  norm = nnx.BatchNorm(6, use_running_average=True, rngs=nnx.Rngs(0))
  norm.mean.set_value(jnp.linspace(-0.2, 0.3, 6))
  norm.var.set_value(jnp.linspace(0.5, 2.0, 6))
  norm.scale.set_value(jnp.array([1.0, -2.0, 0.5, 3.0, -0.1, 1.0]))  # negative s flips codes
  x = jax.random.normal(jax.random.key(0), (5, 40))
  folded = fold_batch_norm(layer, norm)
  np.testing.assert_allclose(folded(x), norm(layer(x)), rtol=1e-5, atol=1e-5)
  kernel = folded.kernel.get_value()
  projection = folded.kernel_quantizer
  assert folded.dot_general.kernel_binarized
  # One scale (or two) per channel: still on the level set, exactly.
  assert bool(lab_optax._src.ste.on_level_set(kernel, projection))
  levels = len(projection.levels)
  assert all(len(np.unique(kernel[:, c])) <= levels for c in range(6))
  ternary = lab_optax.quantize_ste(layer.kernel.get_value(), layer.kernel_quantizer)
  np.testing.assert_array_equal(kernel == 0, ternary == 0)  # zeros stay zeros

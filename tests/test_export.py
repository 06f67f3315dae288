"""Training steps and packed kernels lower for GPU and TPU (``jax.export``), here on CPU.

Nothing is run on the exported code: a primitive without a CUDA or TPU lowering,
a CPU-only custom call or a callback makes ``jax.export.export`` raise. Inputs
are abstract (``jax.ShapeDtypeStruct``, NNX models built under
``nnx.eval_shape``), so nothing is computed either.

``implementation=None`` picks the blocked update (a ``while`` loop) with
``jax.lax.platform_dependent`` on XLA:CPU only: the CUDA/TPU module must not
hold the loop, the CPU one must (in a single-device process), which shows that
the leaves are big enough to take the platform-dependent path at all.
"""

from functools import partial

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import lab_optax
from lab_optax.nnx import BinaryConv, BinaryLinear, BinaryLSTMCell

GPU_TPU = ("cuda", "tpu")
ALL = ("cpu", "cuda", "tpu")
SDS = jax.ShapeDtypeStruct
F32, BF16, U32 = jnp.float32, jnp.bfloat16, jnp.uint32


def lower(fn, *args, platforms=GPU_TPU):
  """``jax.export`` of ``jax.jit(fn)`` for ``platforms``; returns it and its StableHLO text."""
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  assert exported.platforms == platforms
  assert exported.mlir_module_serialized  # the portable artifact
  text = exported.mlir_module()
  assert "func.func public @main" in text
  return exported, text


def assert_outputs(exported, fn, *args):
  """The exported outputs have the structure, shapes and dtypes of ``fn(*args)``."""
  expected = jax.eval_shape(fn, *args)
  assert exported.out_tree == jax.tree.structure(expected)
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [
    (e.shape, e.dtype) for e in jax.tree.leaves(expected)
  ]


def loops(text):
  return text.count("stablehlo.while")


# Where the optimizer's blocked update, a while loop, lowers.
AUTO = "auto"  # implementation=None: XLA:CPU in a single-device process, never CUDA/TPU
BLOCKED = "blocked"  # implementation="blocked": everywhere
REFERENCE = "reference"  # implementation="reference" (or no leaf it applies to): nowhere


def blocked_loop(kind, platform):
  if kind == AUTO:
    return platform == "cpu" and jax.device_count() == 1
  return kind == BLOCKED


# ---------------------------------------------------------------------------
# Optimizer steps.

lab, bwn, binary_connect = lab_optax.lab, lab_optax.bwn, lab_optax.binary_connect
clip = optax.clip_by_global_norm(1.0)

# One line per optimizer: the transformation, the params' dtype, where the blocked loop lowers.
OPTIMIZERS = {
  "lab": (partial(lab, 1e-3), F32, AUTO),
  "bwn": (partial(bwn, 1e-3), F32, AUTO),
  "binary_connect": (partial(binary_connect, 1e-3), F32, AUTO),
  "lab-per_channel": (partial(lab, 1e-3, per_channel=True), F32, AUTO),
  "bwn-per_channel": (partial(bwn, 1e-3, per_channel=True), F32, AUTO),
  "binary_connect-per_channel": (partial(binary_connect, 1e-3, per_channel=True), F32, AUTO),
  "lab-blocked": (partial(lab, 1e-3, implementation="blocked"), F32, BLOCKED),
  "lab-per_channel-blocked": (
    partial(lab, 1e-3, per_channel=True, implementation="blocked"),
    F32,
    BLOCKED,
  ),
  "lab-reference": (partial(lab, 1e-3, implementation="reference"), F32, REFERENCE),
  "lab-bfloat16": (partial(lab, 1e-3), BF16, AUTO),
  "bwn-bfloat16-blocked": (partial(bwn, 1e-3, implementation="blocked"), BF16, BLOCKED),
  "clip-lab": (lambda: optax.chain(clip, lab(1e-3)), F32, AUTO),
  "clip-binary_connect-bfloat16": (lambda: optax.chain(clip, binary_connect(1e-3)), BF16, AUTO),
  "inject_hyperparams-lab": (lambda: optax.inject_hyperparams(lab)(learning_rate=1e-3), F32, AUTO),
}


def optimizer_params(dtype):
  # Binarized leaves of >= 2**12 elements: implementation=None blocks them on CPU.
  return {
    "dense": SDS((64, 64), dtype),
    "conv": SDS((3, 3, 8, 64), dtype),
    "bias": SDS((64,), dtype),
  }


def optimizer_step(tx):
  def loss(params, x):
    h = x @ params["dense"] + params["bias"]
    image = jnp.broadcast_to(x.reshape(1, 8, 8, 1), (1, 8, 8, 8))
    y = jax.lax.conv_general_dilated(
      image, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(h.astype(F32) ** 2) + jnp.sum(jnp.tanh(y.astype(F32)))

  def step(params, opt_state, x):
    grads = jax.grad(loss)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def optimizer_step_args(tx, dtype):
  params = optimizer_params(dtype)
  return params, jax.eval_shape(tx.init, params), SDS((64,), dtype)


@pytest.mark.parametrize(("make_tx", "dtype", "loop"), OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_optimizer_step_lowers_for_gpu_and_tpu(make_tx, dtype, loop):
  tx = make_tx()
  params, opt_state, x = optimizer_step_args(tx, dtype)

  def init(params):
    opt_state = tx.init(params)
    return lab_optax.binarize_params(params, opt_state), opt_state

  exported, _ = lower(init, params)
  assert_outputs(exported, init, params)

  step = optimizer_step(tx)
  for platforms in (GPU_TPU, ("cpu",)):
    exported, text = lower(step, params, opt_state, x, platforms=platforms)
    # The step maps (params, opt_state) to the same shapes and dtypes: it can be iterated.
    assert exported.out_avals == exported.in_avals[:-1]
    assert exported.out_tree == jax.tree.structure((params, opt_state))
    for platform in platforms:
      assert (loops(text) > 0) == blocked_loop(loop, platform), (platforms, loops(text))


def test_optimizer_step_lowers_for_cpu_gpu_and_tpu_in_one_module():
  tx = lab_optax.lab(1e-3)
  args = optimizer_step_args(tx, F32)
  exported, text = lower(optimizer_step(tx), *args, platforms=ALL)
  assert exported.out_avals == exported.in_avals[:-1]
  # The module keeps the CPU branch of platform_dependent, with its loop, next to the
  # reference that CUDA and TPU take.
  assert (loops(text) > 0) == blocked_loop(AUTO, "cpu")


# ---------------------------------------------------------------------------
# NNX training steps.


class ConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = BinaryConv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.hidden = BinaryLinear(4 * 4 * 8, 32, rngs=rngs)  # 2**12 weights
    self.out = BinaryLinear(32, 2, binarize_inputs=True, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.norm(self.conv(x)))
    return self.out(jnp.tanh(self.hidden(x.reshape(x.shape[0], -1))))

  input_shape = (2, 4, 4, 3)


class LSTMNet(nnx.Module):
  def __init__(self, rngs):
    self.cell = BinaryLSTMCell(8, 64, rngs=rngs)  # 64 x 64 recurrent kernels: 2**12 weights
    self.out = BinaryLinear(64, 2, rngs=rngs)

  def __call__(self, xs):
    carry = self.cell.initialize_carry(xs[:, 0].shape, nnx.Rngs(0))
    for t in range(xs.shape[1]):  # unrolled: no while loop but the optimizer's
      carry, h = self.cell(carry, xs[:, t])
    return self.out(h)

  input_shape = (2, 3, 8)


# One line per model.
MODELS = {"conv-batchnorm-linear": ConvNet, "lstm": LSTMNet}


def nnx_train_step(model_cls):
  """A jittable pure step and its abstract state, from a model built under nnx.eval_shape."""

  def build():
    model = model_cls(nnx.Rngs(0))
    mask = lab_optax.nnx.binary_mask(model)
    optimizer = nnx.Optimizer(model, lab_optax.lab(1e-3, mask=mask), wrt=nnx.Param)
    lab_optax.nnx.binarize_model(model, optimizer)
    return model, optimizer

  model, optimizer = nnx.eval_shape(build)
  # binarize_model marked every binary layer: the forward pass skips binarize_ste's check.
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, BinaryLinear | BinaryConv)]
  ops = [m.dot_general if isinstance(m, BinaryLinear) else m.conv_general_dilated for m in layers]
  assert ops and all(op.kernel_binarized for op in ops)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return step, state


@pytest.mark.parametrize("model_cls", MODELS.values(), ids=MODELS)
def test_nnx_train_step_lowers_for_gpu_and_tpu(model_cls):
  step, state = nnx_train_step(model_cls)
  x = SDS(model_cls.input_shape, F32)
  y = SDS((2, 2), F32)
  for platforms in (GPU_TPU, ("cpu",)):
    exported, text = lower(step, state, x, y, platforms=platforms)
    # (loss, new state): the state keeps its shapes and dtypes (BatchNorm's statistics too).
    assert exported.out_avals[0].shape == ()
    assert exported.out_avals[1:] == exported.in_avals[:-2]
    for platform in platforms:
      assert (loops(text) > 0) == blocked_loop(AUTO, platform), (platforms, loops(text))


# ---------------------------------------------------------------------------
# Packed kernels.


def packed(shape, per_channel=False):
  """An abstract PackedBinary of a float32 kernel of ``shape``."""
  return jax.eval_shape(partial(lab_optax.pack, per_channel=per_channel), SDS(shape, F32))


PACK_PARAMS = {"dense": SDS((70, 8), F32), "conv": SDS((3, 3, 4, 8), BF16), "bias": SDS((8,), F32)}


def packed_params(per_channel):
  return jax.eval_shape(partial(lab_optax.pack, per_channel=per_channel), PACK_PARAMS)


# One line per kernel: the function and its (abstract) arguments.
KERNELS = {
  "pack_bits": (lab_optax.pack_bits, lambda: (SDS((4, 70), F32),)),
  "xnor_matmul": (
    partial(lab_optax.xnor_matmul, k=70),
    lambda: (SDS((4, 3), U32), SDS((5, 3), U32)),
  ),
  "xnor_matmul-traced_k": (
    lab_optax.xnor_matmul,
    lambda: (SDS((4, 12), U32), SDS((5, 12), U32), SDS((), jnp.int32)),
  ),
  "binary_dense": (lab_optax.binary_dense, lambda: (SDS((3, 70), F32), packed((70, 8)))),
  "binary_dense-bfloat16-per_channel": (
    lab_optax.binary_dense,
    lambda: (SDS((2, 3, 70), BF16), packed((70, 8), per_channel=True)),
  ),
  "xnor_dense": (
    lab_optax.xnor_dense,
    lambda: (SDS((3, 70), F32), packed((70, 8), per_channel=True)),
  ),
  "binary_conv": (
    partial(lab_optax.binary_conv, strides=2),
    lambda: (SDS((2, 6, 6, 4), F32), packed((3, 3, 4, 8))),
  ),
  "xnor_conv-same": (  # with the correction for the taps on padding
    lab_optax.xnor_conv,
    lambda: (SDS((2, 6, 6, 4), F32), packed((3, 3, 4, 8), per_channel=True)),
  ),
  "xnor_conv-valid-groups": (
    partial(lab_optax.xnor_conv, padding="VALID", feature_group_count=2),
    lambda: (SDS((2, 6, 6, 4), F32), packed((3, 3, 2, 8))),
  ),
  "pack": (partial(lab_optax.pack, per_channel=False), lambda: (PACK_PARAMS,)),
  "pack-per_channel": (partial(lab_optax.pack, per_channel=True), lambda: (PACK_PARAMS,)),
  "unpack": (lab_optax.unpack, lambda: (packed_params(per_channel=False),)),
  "unpack-per_channel": (lab_optax.unpack, lambda: (packed_params(per_channel=True),)),
}


@pytest.mark.parametrize(("fn", "make_args"), KERNELS.values(), ids=KERNELS)
def test_packed_kernel_lowers_for_gpu_and_tpu(fn, make_args):
  args = make_args()
  exported, _ = lower(fn, *args)
  assert_outputs(exported, fn, *args)


class PackedNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = BinaryConv(3, 8, (3, 3), rngs=rngs)
    self.xconv = BinaryConv(8, 8, (3, 3), strides=2, binarize_inputs=True, rngs=rngs)
    self.dense = BinaryLinear(2 * 2 * 8, 40, rngs=rngs)
    self.xdense = BinaryLinear(40, 3, binarize_inputs=True, rngs=rngs)

  def __call__(self, x):
    x = self.xconv(jnp.tanh(self.conv(x)))
    return self.xdense(jnp.tanh(self.dense(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_model_forward_lowers_for_gpu_and_tpu(per_channel):
  def build():
    model = PackedNet(nnx.Rngs(0))
    # Binarized kernels, as training leaves them. Traced values cannot tell the alpha
    # layout: pack_model needs per_channel here.
    for _, variable in nnx.iter_graph(model):
      if isinstance(variable, lab_optax.nnx.BinaryParam):
        variable.set_value(lab_optax.binarize_ste(variable.get_value()))
    return lab_optax.nnx.pack_model(model, per_channel=per_channel)

  graphdef, state = nnx.split(nnx.eval_shape(build))
  kernels = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, lab_optax.PackedBinary))
  assert sum(isinstance(k, lab_optax.PackedBinary) for k in kernels) == 4

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  exported, _ = lower(forward, state, SDS((2, 4, 4, 3), F32))
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [((2, 3), F32)]

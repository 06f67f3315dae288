"""Tests of ternary and m-bit packing: level sets, bit planes, exact round trips, inference, files."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lab_optax
from lab_optax import projections
from lab_optax._src import ste
from lab_optax._src.transform import _round_scale

# name: (optimizer, bits per weight as stored)
METHODS = {
  "lat": (functools.partial(lab_optax.lat, 1e-2), 2),
  "lat2": (functools.partial(lab_optax.lat, 1e-2, scales=2), 2),
  "twn": (functools.partial(lab_optax.twn, 1e-2), 2),
  "absmean": (functools.partial(lab_optax.absmean_ternary, 1e-2), 2),
  "laq3": (functools.partial(lab_optax.laq, 1e-2, bits=3), 3),
  "laq4-log": (functools.partial(lab_optax.laq, 1e-2, bits=4, levels="log"), 4),
  "laq8": (functools.partial(lab_optax.laq, 1e-2, bits=8), 8),
}
SHAPES = {"w": (70, 6), "conv": (3, 3, 4, 6)}


def bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  view = np.dtype(f"u{a.dtype.itemsize}")
  np.testing.assert_array_equal(a.view(view), b.view(view))


def projection(method):
  return METHODS[method][0]().init({"w": jnp.ones((2, 2))}).projection


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _on_levels(w, method, per_channel, dtype, headroom):
  proj = projection(method)
  axis = tuple(range(w.ndim - 1)) if per_channel else None
  scale = ste._top_scale(w, proj, axis) * headroom
  scale = _round_scale(scale, dtype, proj.divisor)
  codes = projections.Projection.codes(proj, w, scale, axis)
  return proj.dequantize(codes, scale).astype(dtype)


@functools.cache
def quantized(method, per_channel=False, dtype="float32"):
  """Params on the method's level set, as its optimizer writes them: ``dequantize(codes, scale)``
  with the scale rounded as the optimizer rounds it. The m-bit ones leave their top codes
  unused in some channels (a scale above ``max|w|``, as LAQ's least squares may give)."""
  rng = np.random.default_rng(0)
  params = {}
  for i, (name, shape) in enumerate(SHAPES.items()):
    w = jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
    headroom = 1.0 if METHODS[method][1] == 2 or i == 0 else 1.3
    params[name] = _on_levels(w, method, per_channel, dtype, headroom)
  params["bias"] = jnp.linspace(-1, 1, 6, dtype=dtype)
  return params


# Each method once per layout where it adds a path (two scales, top codes unused, many levels).
@pytest.mark.parametrize(
  "method, per_channel",
  [
    ("lat", False),
    ("lat", True),
    ("lat2", True),
    ("twn", False),
    ("absmean", True),
    ("laq3", False),
    ("laq3", True),
    ("laq4-log", False),
    ("laq8", True),
  ],
)
def test_round_trip_is_bitwise_with_the_bits_of_the_level_set(method, per_channel):
  params = quantized(method, per_channel)
  packed = lab_optax.pack(params, projection=projection(method))
  bits = METHODS[method][1]
  # Recognized without the projection where the top level is used ("w").
  recognized = lab_optax.pack(params, mask={"w": True, "conv": False, "bias": False})
  bitwise_equal(recognized["w"].planes, packed["w"].planes)
  for name, shape in SHAPES.items():
    leaf = packed[name]
    assert isinstance(leaf, lab_optax.PackedQuantized), (name, type(leaf))
    assert leaf.bits_per_weight == bits and leaf.planes.shape == (
      bits,
      shape[-1],
      math.ceil(math.prod(shape[:-1]) / 32),
    )
    scales = (2,) if method == "lat2" else ()
    assert leaf.scale.shape == scales + ((shape[-1],) if per_channel else ())
  assert packed["bias"] is params["bias"]
  jax.tree.map(bitwise_equal, lab_optax.unpack(packed), params)


@pytest.mark.parametrize("method", ["lat", "laq3"])
def test_round_trip_in_bfloat16(method):
  params = quantized(method, dtype="bfloat16")
  packed = lab_optax.pack(params, projection=projection(method))
  assert isinstance(packed["w"], lab_optax.PackedQuantized)
  jax.tree.map(bitwise_equal, lab_optax.unpack(packed), params)


def test_projection_given_and_under_jit():
  params = quantized("laq3", per_channel=True)
  laq3 = projection("laq3")
  eager = lab_optax.pack(params, projection=laq3)
  jitted = jax.jit(lambda p: lab_optax.pack(p, per_channel=True, projection=laq3))(params)
  jax.tree.map(bitwise_equal, jitted, eager)
  jax.tree.map(bitwise_equal, jax.jit(lab_optax.unpack)(jitted), params)
  # A binary leaf packed on a ternary level set takes the ternary planes.
  binary = {"w": jnp.array([[0.5, -0.5], [-0.5, 0.5]])}
  as_ternary = lab_optax.pack(binary, projection=projections.TernaryProjection())["w"]
  assert isinstance(as_ternary, lab_optax.PackedQuantized) and as_ternary.bits_per_weight == 2
  assert isinstance(lab_optax.pack(binary)["w"], lab_optax.PackedBinary)


def test_recognizes_the_fewest_levels():
  # Ternary values are on every m-bit level set too: they pack as ternary.
  ternary = {"w": jnp.array([[0.25, 0.0, -0.25], [0.0, 0.25, 0.25]])}
  assert lab_optax.pack(ternary)["w"].bits_per_weight == 2
  # 3-bit linear levels {0, 1/3, 2/3, 1} * 0.75 (one channel: no per-channel scales).
  mbit = {"w": jnp.array([[0.75], [0.5], [-0.25], [0.0], [-0.75], [0.25], [-0.5], [0.5]])}
  leaf = lab_optax.pack(mbit)["w"]
  assert leaf.bits_per_weight == 3 and leaf.levels == tuple(projections.MbitProjection(3).levels)
  bitwise_equal(lab_optax.unpack({"w": leaf})["w"], mbit["w"])


def test_a_free_top_level_needs_the_projection():
  params = quantized("laq8", per_channel=True)  # "conv" leaves its top codes unused
  with pytest.raises(ValueError, match=r"\['conv'\] is not quantized"):
    lab_optax.pack(params)
  packed = lab_optax.pack(params, projection=projection("laq8"))
  jax.tree.map(bitwise_equal, lab_optax.unpack(packed), params)


def test_refuses_leaves_off_the_given_level_set_and_asymmetric_levels():
  params = quantized("laq3")
  with pytest.raises(ValueError, match=r"\['conv'\] is not on the level set of TernaryProj"):
    lab_optax.pack(params, projection=projections.TernaryProjection())

  class Asymmetric(projections.Projection):
    levels = (-1.0, 0.0, 0.5, 1.0)

  ternary = {"w": jnp.array([[0.5, 0.0], [-0.5, 0.5]])}
  with pytest.raises(ValueError, match=r"\['w'\].*symmetric about 0"):
    lab_optax.pack(ternary, projection=Asymmetric())


def numpy_sign(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0)


@pytest.mark.parametrize("method", ["lat", "lat2", "laq3", "laq4-log"])
def test_dense_inference_matches_the_float_product(method):
  params = quantized(method, per_channel=True)
  packed = lab_optax.pack(params)["w"]
  w = np.asarray(params["w"], np.float64)
  x = np.random.default_rng(1).normal(size=(9, w.shape[0])).astype(np.float32)
  dense, xnor = jax.jit(lambda x, p: (lab_optax.binary_dense(x, p), lab_optax.xnor_dense(x, p)))(
    x, packed
  )
  np.testing.assert_allclose(dense, x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(xnor, numpy_sign(x) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lat2", "laq3", "laq4-log"])
def test_conv_inference_matches_lax_conv(method):
  params = quantized(method, per_channel=True)
  kernel = params["conv"]  # (3, 3, 4, 6): 2 groups of 2 input channels -> 3 outputs each
  kernel = kernel[:, :, :2, :]
  packed = lab_optax.pack(
    {"k": kernel},
    per_channel=True,
    projection=projection(method),
  )["k"]
  x = np.random.default_rng(2).normal(size=(2, 7, 6, 4)).astype(np.float32)
  args = {"strides": (2, 1), "padding": "SAME", "feature_group_count": 2}

  def reference(x):
    return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=args["strides"],
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2,
      precision=jax.lax.Precision.HIGHEST,
    )

  @jax.jit
  def run(x, p):
    return lab_optax.binary_conv(x, p, **args), lab_optax.xnor_conv(x, p, **args)

  real, xnor = run(x, packed)
  np.testing.assert_allclose(real, reference(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    xnor, reference(jnp.asarray(numpy_sign(x), jnp.float32)), rtol=1e-5, atol=1e-5
  )


def test_file_round_trip_states_bits_per_weight(tmp_path):
  ternary = quantized("lat")
  mbit = quantized("laq3", per_channel=True)
  binary = {"w": jnp.array([[0.5, -0.5], [-0.5, 0.5]])}
  tree = {
    "t": lab_optax.pack(ternary),
    "m": lab_optax.pack(mbit, projection=projection("laq3")),
    "b": lab_optax.pack(binary),
  }
  path = tmp_path / "model.npz"
  lab_optax.save_packed(path, tree)
  restored = lab_optax.load_packed(path)
  jax.tree.map(bitwise_equal, lab_optax.unpack(restored), {"t": ternary, "m": mbit, "b": binary})
  assert restored["m"]["conv"].levels == tree["m"]["conv"].levels
  with np.load(path) as npz:
    meta = json.loads(npz["__meta__"].tobytes())
  kinds = {e["path"]: (e["kind"], e["bits"]) for e in meta["packed"]}
  assert kinds["['t']['w']"] == ("quantized", 2) and kinds["['m']['conv']"] == ("quantized", 3)
  assert kinds["['b']['w']"] == ("binary", 1)
  sizes = [math.prod(e["shape"]) for e in meta["packed"]]
  expected = sum(s * b for s, (_, b) in zip(sizes, kinds.values())) / sum(sizes)
  assert meta["bits_per_weight"] == pytest.approx(expected)
  # A template with a binary leaf where the file has a ternary one is refused.
  like = dict(tree, t=dict(tree["t"], w=lab_optax.pack({"w": jnp.ones(SHAPES["w"])})["w"]))
  with pytest.raises(ValueError, match=r"\['t'\]\['w'\]"):
    lab_optax.load_packed(path, like=like)
  assert lab_optax.load_packed(path, like=tree)["m"]["w"].bits_per_weight == 3
  assert sorted(os.listdir(tmp_path)) == ["model.npz"]


def mlp_kernels():
  """The paper's MNIST MLP: 784-2048-2048-2048-10."""
  sizes = [784, 2048, 2048, 2048, 10]
  return {
    f"dense{i}": jax.ShapeDtypeStruct((a, b), jnp.float32)
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def packed_bytes(projection, per_channel=False):
  shapes = jax.eval_shape(
    lambda p: lab_optax.pack(p, per_channel=per_channel, projection=projection), mlp_kernels()
  )
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def test_file_sizes_on_the_paper_mlp():
  float_bytes = sum(4 * math.prod(x.shape) for x in mlp_kernels().values())
  ternary = packed_bytes(projections.TernaryProjection(), per_channel=True)
  assert float_bytes / ternary >= 15
  for bits in range(3, 9):
    ratio = float_bytes / packed_bytes(projections.MbitProjection(bits), per_channel=True)
    assert ratio >= 0.95 * 32 / bits, (bits, ratio)

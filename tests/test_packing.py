"""Tests of 1-bit packing, XNOR-popcount products, inference helpers and the packed file."""

import collections
import functools
import os
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lab_optax

Pair = collections.namedtuple("Pair", ["first", "second"])


def pm1(rng, shape):
  return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def np_pack_bits(x):
  """Reference layout: bit i % 32 of word i // 32, set where x >= 0."""
  x = np.asarray(x)
  k = x.shape[-1]
  bits = np.zeros((*x.shape[:-1], -(-k // 32) * 32), np.uint64)
  bits[..., :k] = x >= 0
  bits = bits.reshape(*x.shape[:-1], -1, 32)
  return np.sum(bits << np.arange(32, dtype=np.uint64), axis=-1).astype(np.uint32)


def bitwise_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  view = np.dtype(f"u{a.dtype.itemsize}")
  np.testing.assert_array_equal(a.view(view), b.view(view))


def trained_params(shapes, *, dtype=jnp.float32, per_channel=False, steps=3, seed=0):
  """Params after lab's t = 1 projection and a few update steps, in one compilation
  per structure, dtype and layout (shared by the tests)."""
  rng = np.random.default_rng(seed)
  params = {
    name: jnp.asarray(rng.uniform(-0.5, 0.5, shape), dtype) for name, shape in shapes.items()
  }
  params["bias"] = jnp.linspace(-1, 1, 5, dtype=dtype)
  return _train(params, jax.random.key(seed), per_channel, steps)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _train(params, key, per_channel, steps):
  tx = lab_optax.lab(1e-2, per_channel=per_channel)
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)

  def step(i, carry):
    params, state = carry
    keys = jax.random.split(jax.random.fold_in(key, i), len(params))
    grads = {n: jax.random.normal(k, p.shape, p.dtype) for k, (n, p) in zip(keys, params.items())}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.lax.fori_loop(0, steps, step, (params, state))[0]


# ---------------------------------------------------------------------------
# pack_bits and xnor_matmul.


@pytest.mark.parametrize("k", [1, 31, 32, 33, 63, 64, 100])
def test_pack_bits_layout_matches_numpy_reference(k):
  x = np.random.default_rng(k).normal(size=(3, 2, k)).astype(np.float32)
  x[0, 0, 0] = 0.0  # sign(0) = +1
  x[0, 1, 0] = -0.0
  x[1, 0, 0] = np.nan  # NaN counts as negative, as in binary_sign
  got = jax.jit(lab_optax.pack_bits)(x)
  assert got.dtype == jnp.uint32 and got.shape == (3, 2, -(-k // 32))
  np.testing.assert_array_equal(got, np_pack_bits(x))
  assert int(got[0, 0, 0]) & 1 and int(got[0, 1, 0]) & 1 and not int(got[1, 0, 0]) & 1
  if k % 32:
    # The padding bits of the last word are zero.
    assert not np.any(np.asarray(got[..., -1]) >> np.uint32(k % 32))


def test_pack_bits_rejects_scalars_and_bools():
  with pytest.raises(ValueError, match="scalar"):
    lab_optax.pack_bits(jnp.float32(1.0))
  with pytest.raises(ValueError, match="bool"):
    lab_optax.pack_bits(jnp.ones(3, bool))


def xnor(a, b):
  return lab_optax.xnor_matmul(lab_optax.pack_bits(a), lab_optax.pack_bits(b.T), a.shape[1])


@pytest.mark.parametrize("k", [32, 1000, 2048])
def test_xnor_matmul_equals_integer_product(k):
  rng = np.random.default_rng(k)
  a, b = pm1(rng, (7, k)), pm1(rng, (k, 9))
  expected = a.astype(np.int64) @ b.astype(np.int64)
  got = jax.jit(xnor)(a, b)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, expected)


@settings(max_examples=10, deadline=None)
@given(
  m=st.integers(1, 9), k=st.integers(1, 200), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1)
)
def test_xnor_matmul_property(m, k, n, seed):
  rng = np.random.default_rng(seed)
  a, b = pm1(rng, (m, k)), pm1(rng, (k, n))
  # Jitted: one compilation per drawn shape instead of one per operation.
  np.testing.assert_array_equal(jax.jit(xnor)(a, b), a.astype(np.int64) @ b.astype(np.int64))


def test_xnor_matmul_k_may_be_traced():
  rng = np.random.default_rng(0)
  a, b = pm1(rng, (4, 70)), pm1(rng, (70, 5))
  a_bits, b_bits = lab_optax.pack_bits(a), lab_optax.pack_bits(b.T)
  got = jax.jit(lab_optax.xnor_matmul)(a_bits, b_bits, jnp.int32(70))
  np.testing.assert_array_equal(got, a @ b)


@pytest.mark.parametrize("k", [1, 33, 63, 100])
def test_padding_never_changes_xnor_results(k):
  # Extending both operands to a whole number of words with explicit +1 entries
  # adds exactly the padding length; the implicit zero-bit padding adds nothing.
  rng = np.random.default_rng(k)
  a, b = pm1(rng, (5, k)), pm1(rng, (k, 6))
  pad = -(-k // 32) * 32 - k
  a_full = np.concatenate([a, np.ones((5, pad), np.float32)], axis=1)
  b_full = np.concatenate([b, np.ones((pad, 6), np.float32)], axis=0)
  padded = lab_optax.pack_bits(a), lab_optax.pack_bits(b.T)
  full = lab_optax.pack_bits(a_full), lab_optax.pack_bits(b_full.T)
  assert padded[0].shape == full[0].shape
  np.testing.assert_array_equal(lab_optax.xnor_matmul(*padded, k), a @ b)
  np.testing.assert_array_equal(lab_optax.xnor_matmul(*full, k + pad) - pad, a @ b)


def test_xnor_matmul_validates_operands():
  bits = jnp.zeros((2, 3), jnp.uint32)
  with pytest.raises(ValueError, match="does not fit 3"):
    lab_optax.xnor_matmul(bits, bits, 64)
  with pytest.raises(ValueError, match="does not fit 3"):
    lab_optax.xnor_matmul(bits, bits, 97)
  with pytest.raises(ValueError, match="different lengths"):
    lab_optax.xnor_matmul(bits, jnp.zeros((2, 2), jnp.uint32), 64)
  with pytest.raises(ValueError, match="uint32"):
    lab_optax.xnor_matmul(bits.astype(jnp.int32), bits, 96)
  with pytest.raises(ValueError, match="2-D"):
    lab_optax.xnor_matmul(bits[0], bits, 96)


# ---------------------------------------------------------------------------
# pack and unpack.

DENSE_SHAPES = {
  f"dense_{k}": (k, n) for k, n in [(32, 8), (1000, 6), (2048, 5), (1, 4), (33, 3), (63, 7)]
}
OTHER_SHAPES = {
  "conv": (3, 3, 5, 8),
  "conv_1x1": (1, 1, 40, 3),
  "lstm_ih": (20, 64),
  "lstm_hh": (16, 64),
}


@pytest.mark.parametrize(
  "dtype, per_channel",
  [
    (jnp.bfloat16, True),
    pytest.param(jnp.float32, False, marks=pytest.mark.slow),
    pytest.param(jnp.float32, True, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, False, marks=pytest.mark.slow),
  ],
)
def test_pack_unpack_round_trip_is_bitwise(dtype, per_channel):
  shapes = {**DENSE_SHAPES, **OTHER_SHAPES}
  if per_channel:  # one alpha per channel needs more than one weight per channel
    shapes = {name: shape for name, shape in shapes.items() if np.prod(shape[:-1]) > 1}
  params = trained_params(shapes, dtype=dtype, per_channel=per_channel)
  packed = lab_optax.pack(params)
  assert packed["bias"] is params["bias"]
  for name, shape in shapes.items():
    leaf = packed[name]
    assert isinstance(leaf, lab_optax.PackedBinary)
    k, n = int(np.prod(shape[:-1])), shape[-1]
    assert leaf.shape == shape and leaf.dtype == jnp.dtype(dtype).name
    assert leaf.bits.dtype == jnp.uint32 and leaf.bits.shape == (n, -(-k // 32))
    # A leaf with one output channel cannot tell per-channel from per-tensor apart.
    assert leaf.alpha.dtype == jnp.float32
    assert leaf.alpha.shape == ((n,) if per_channel and n > 1 else ())
    np.testing.assert_array_equal(leaf.bits, np_pack_bits(np.asarray(params[name]).reshape(k, n).T))
  restored = jax.jit(lab_optax.unpack)(packed)
  chex.assert_trees_all_equal_structs(restored, params)
  jax.tree.map(bitwise_equal, restored, params)


@pytest.mark.parametrize("per_channel", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pack_under_jit_matches_eager(per_channel):
  params = trained_params(OTHER_SHAPES, per_channel=per_channel)
  eager = lab_optax.pack(params)
  jitted = jax.jit(functools.partial(lab_optax.pack, per_channel=per_channel))(params)
  chex.assert_trees_all_equal(jitted, eager)
  jax.tree.map(bitwise_equal, lab_optax.unpack(jitted), params)


def test_pack_without_per_channel_under_jit_asks_for_it():
  params = trained_params({"w": (4, 3)})
  with pytest.raises(ValueError, match="per_channel"):
    jax.jit(lab_optax.pack)(params)


def test_pack_keeps_exact_zeros_and_signs():
  w = jnp.array([[0.0, -0.0], [-0.0, 0.0]])  # alpha = 0
  restored = lab_optax.unpack(lab_optax.pack({"w": w}))["w"]
  bitwise_equal(restored, w)


def test_pack_refuses_leaf_that_is_not_binarized():
  params = trained_params({"w": (6, 4)})
  params = {"layers": [params, {"kernel": jnp.arange(12.0).reshape(3, 4)}]}
  with pytest.raises(ValueError, match=r"\['layers'\]\[1\]\['kernel'\] is not quantized"):
    lab_optax.pack(params)
  mask = {"layers": [jax.tree.map(lambda p: p.ndim >= 2, params["layers"][0]), {"kernel": False}]}
  packed = lab_optax.pack(params, mask)
  assert packed["layers"][1]["kernel"] is params["layers"][1]["kernel"]
  assert isinstance(packed["layers"][0]["w"], lab_optax.PackedBinary)


def test_pack_checks_a_given_layout():
  per_channel = trained_params({"w": (6, 4)}, per_channel=True)
  with pytest.raises(ValueError, match="per_channel=False"):
    lab_optax.pack(per_channel, per_channel=False)
  per_tensor = trained_params({"w": (6, 4)})
  packed = lab_optax.pack(per_tensor, per_channel=True)
  assert packed["w"].alpha.shape == (4,)
  jax.tree.map(bitwise_equal, lab_optax.unpack(packed), per_tensor)


def test_pack_refuses_nan_and_scalars():
  with pytest.raises(ValueError, match=r"\['w'\] is not quantized"):
    lab_optax.pack({"w": jnp.array([[1.0, jnp.nan], [1.0, -1.0]])})
  with pytest.raises(ValueError, match=r"scalar leaf at \['s'\]"):
    lab_optax.pack({"s": jnp.float32(1.0)}, mask={"s": True})


# ---------------------------------------------------------------------------
# Inference helpers.


def test_binary_dense_and_xnor_dense_match_float_inference():
  params = trained_params({"w": (100, 12)}, per_channel=True)
  packed = lab_optax.pack(params)["w"]
  w = np.asarray(params["w"], np.float64)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 100)).astype(np.float32)
  got = jax.jit(lab_optax.binary_dense)(x, packed)
  assert got.shape == (2, 3, 12) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)

  xb = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
  signs = np.where(w >= 0, 1.0, -1.0)
  alpha = np.asarray(packed.alpha)
  # Integer path: sign(x) @ sign(w) is exact; alpha scales it once in float32.
  exact = (xb @ signs).astype(np.float32) * alpha
  np.testing.assert_array_equal(jax.jit(lab_optax.xnor_dense)(xb, packed), exact)
  np.testing.assert_array_equal(lab_optax.xnor_dense(x, packed), exact)  # binarizes x itself
  np.testing.assert_array_equal(lab_optax.binary_dense(xb, packed), exact)
  np.testing.assert_allclose(exact, xb @ w, rtol=1e-6)


def test_dense_helpers_keep_bfloat16_and_check_shapes():
  params = trained_params({"w": (33, 4)}, dtype=jnp.bfloat16)
  packed = lab_optax.pack(params)["w"]
  x = jnp.ones((2, 33), jnp.bfloat16)
  assert lab_optax.binary_dense(x, packed).dtype == jnp.bfloat16
  assert lab_optax.xnor_dense(x, packed).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="length 33"):
    lab_optax.binary_dense(jnp.ones((2, 32)), packed)
  with pytest.raises(TypeError, match="PackedBinary"):
    lab_optax.xnor_dense(x, params["w"])


CONV_CASES = [
  dict(strides=1, padding="SAME"),
  dict(strides=2, padding="VALID"),
  dict(strides=(2, 1), padding=1),
  dict(strides=1, padding=((2, 0), (1, 3))),
  dict(strides=1, padding="SAME", kernel_dilation=2),
  dict(strides=1, padding=((1, 2), (0, 1)), input_dilation=2),
  dict(strides=1, padding="SAME_LOWER", feature_group_count=2),
]


def lax_conv(x, kernel, *, strides=1, padding="SAME", kernel_dilation=1, input_dilation=1,
             feature_group_count=1):  # fmt: skip
  n = kernel.ndim - 2
  tup = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
  if isinstance(padding, int):
    padding = ((padding, padding),) * n
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=tup(strides),
    padding=padding,
    lhs_dilation=tup(input_dilation),
    rhs_dilation=tup(kernel_dilation),
    dimension_numbers=("NHWC", "HWIO", "NHWC") if n == 2 else ("NWC", "WIO", "NWC"),
    feature_group_count=feature_group_count,
    precision=jax.lax.Precision.HIGHEST,
  )


# Each case with one layout by default (alternating), both with -m slow.
@pytest.mark.parametrize(
  "case, per_channel",
  [
    pytest.param(
      case,
      per_channel,
      marks=() if per_channel == bool(i % 2) else pytest.mark.slow,
      id=f"{per_channel}-" + ",".join(f"{k}={v}" for k, v in case.items()),
    )
    for i, case in enumerate(CONV_CASES)
    for per_channel in (False, True)
  ],
)
def test_conv_helpers_match_lax_conv(case, per_channel):
  groups = case.get("feature_group_count", 1)
  params = trained_params({"kernel": (3, 3, 6 // groups, 8)}, per_channel=per_channel)
  packed = lab_optax.pack(params)["kernel"]
  kernel = params["kernel"]
  x = jax.random.normal(jax.random.key(1), (2, 7, 6, 6))

  got = jax.jit(functools.partial(lab_optax.binary_conv, **case))(x, packed)
  want = lax_conv(x, kernel, **case)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # Integer path: +-1 inputs and kernel give exact integer sums in float32.
  xb = lab_optax.binary_sign(x)
  signs = lab_optax.binary_sign(kernel)
  exact = lax_conv(xb, signs, **case) * packed.alpha
  got = jax.jit(functools.partial(lab_optax.xnor_conv, **case))(xb, packed)
  np.testing.assert_array_equal(got, exact)
  np.testing.assert_allclose(got, lax_conv(xb, kernel, **case), rtol=1e-5, atol=1e-5)


def test_conv_helpers_1d_and_unbatched():
  params = trained_params({"kernel": (5, 4, 3)})
  packed = lab_optax.pack(params)["kernel"]
  x = lab_optax.binary_sign(jax.random.normal(jax.random.key(2), (9, 4)))  # no batch axis
  want = lax_conv(x[None], lab_optax.binary_sign(params["kernel"]))[0] * packed.alpha
  got = lab_optax.xnor_conv(x, packed)
  assert got.shape == (9, 3)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(lab_optax.binary_conv(x, packed), want, rtol=1e-6)
  with pytest.raises(ValueError, match="spatial"):
    lab_optax.xnor_conv(jnp.ones((2, 9, 5)), packed)


# ---------------------------------------------------------------------------
# Files.


def mixed_tree(dtype=jnp.float32):
  params = trained_params({"dense": (70, 6), "conv": (3, 3, 2, 4)}, dtype=dtype)
  packed = lab_optax.pack(params)
  return {
    "layers": [packed["dense"], {"conv": packed["conv"], "bias": packed["bias"]}],
    "pair": (jnp.arange(3, dtype=jnp.int32), None),
    "scale": jnp.float32(0.5),
    "by_index": {7: {"bf16": jnp.linspace(0, 1, 4, dtype=jnp.bfloat16)}, 0: jnp.ones(2)},
  }


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(bitwise_equal, a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
  tree = mixed_tree(dtype)
  path = tmp_path / "model.packed"
  lab_optax.save_packed(path, tree)
  assert os.listdir(tmp_path) == ["model.packed"]  # used as given, no temporary left
  loaded = lab_optax.load_packed(path)
  assert_same_tree(loaded, tree)
  assert isinstance(loaded["pair"], tuple) and isinstance(loaded["layers"], list)
  assert_same_tree(lab_optax.unpack(loaded), lab_optax.unpack(tree))
  assert_same_tree(lab_optax.load_packed(path, like=tree), tree)


def test_save_overwrites_atomically(tmp_path):
  path = tmp_path / "m.npz"
  lab_optax.save_packed(path, {"old": jnp.zeros(1)})
  tree = mixed_tree()
  lab_optax.save_packed(path, tree)
  assert sorted(os.listdir(tmp_path)) == ["m.npz"]
  assert_same_tree(lab_optax.load_packed(path), tree)


def test_save_load_nnx_state(tmp_path):
  model = nnx.Sequential(
    nnx.Linear(40, 8, rngs=nnx.Rngs(0)),
    nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
    nnx.Linear(8, 3, rngs=nnx.Rngs(1)),
  )
  state = nnx.state(model)
  tx = lab_optax.bwn(1e-2)
  opt_state = tx.init(state)
  state = lab_optax.binarize_params(state, opt_state)
  packed = lab_optax.pack(state)
  assert isinstance(packed["layers"][0]["kernel"].get_value(), lab_optax.PackedBinary)
  path = tmp_path / "nnx.npz"
  lab_optax.save_packed(path, packed)
  loaded = lab_optax.load_packed(path)
  assert type(loaded) is nnx.State
  assert_same_tree(loaded, packed)
  restored = lab_optax.unpack(loaded)
  assert_same_tree(restored, state)
  nnx.update(model, restored)
  x = jnp.ones((2, 40))
  model.eval()
  np.testing.assert_array_equal(model(x), nnx.merge(nnx.graphdef(model), state)(x))


def test_custom_nodes_need_a_template(tmp_path):
  tree = {"pair": Pair(jnp.ones(2), lab_optax.pack({"w": jnp.ones((3, 2))})["w"])}
  path = tmp_path / "pair.npz"
  lab_optax.save_packed(path, tree)
  with pytest.raises(ValueError, match=r"Pair.*\['pair'\].*like=template"):
    lab_optax.load_packed(path)
  loaded = lab_optax.load_packed(path, like=tree)
  assert isinstance(loaded["pair"], Pair)
  assert_same_tree(loaded, tree)


def test_load_refuses_mismatched_template(tmp_path):
  tree = mixed_tree()
  path = tmp_path / "model.npz"
  lab_optax.save_packed(path, tree)
  shapes = jax.eval_shape(lambda: tree)
  assert_same_tree(lab_optax.load_packed(path, like=shapes), tree)

  renamed = {**tree, "scales": tree["scale"]}
  del renamed["scale"]
  with pytest.raises(ValueError, match=r"model.npz: .*\['scale'\] in the file but at \['scales'\]"):
    lab_optax.load_packed(path, like=renamed)
  wider = {**tree, "pair": (jnp.arange(4, dtype=jnp.int32), None)}
  with pytest.raises(
    ValueError, match=r"at \['pair'\]\[0\]: the file has int32\(3,\), the template int32\(4,\)"
  ):
    lab_optax.load_packed(path, like=wider)
  extra = {**tree, "zzz": jnp.zeros(1)}
  with pytest.raises(ValueError, match=r"only the template has a leaf at \['zzz'\]"):
    lab_optax.load_packed(path, like=extra)
  dense = tree["layers"][0]
  reshaped = lab_optax.PackedBinary(dense.bits, dense.alpha, (2, 35, 6), dense.dtype)
  other = {**tree, "layers": [reshaped, tree["layers"][1]]}
  with pytest.raises(
    ValueError, match=r"at \['layers'\]\[0\]: the file has a PackedBinary float32\(70, 6\)"
  ):
    lab_optax.load_packed(path, like=other)


def test_load_refuses_truncated_files(tmp_path):
  path = tmp_path / "model.npz"
  lab_optax.save_packed(path, mixed_tree())
  data = path.read_bytes()
  for size in (0, 10, len(data) // 2, len(data) - 1):
    bad = tmp_path / f"cut{size}.npz"
    bad.write_bytes(data[:size])
    with pytest.raises(
      ValueError, match=rf"cut{size}.npz: cannot read the file, it is truncated or corrupted"
    ):
      lab_optax.load_packed(bad)


def test_load_refuses_flipped_bytes(tmp_path):
  tree = mixed_tree()
  path = tmp_path / "model.npz"
  lab_optax.save_packed(path, tree)
  data = path.read_bytes()
  # Flips inside the stored payloads: the dense bits and the JSON metadata.
  targets = [
    data.find(np.asarray(tree["layers"][0].bits).tobytes()) + 5,
    data.find(b'"structure"') + 3,
  ]
  assert min(targets) > 5
  for i, offset in enumerate(targets):
    bad = tmp_path / f"flip{i}.npz"
    bad.write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :])
    with pytest.raises(ValueError, match=rf"flip{i}.npz: .*corrupted"):
      lab_optax.load_packed(bad)
  # Anywhere else a flip is refused or, where the zip format ignores that byte,
  # changes nothing: never wrong data and never another exception.
  rng = np.random.default_rng(0)
  refused = 0
  for offset in rng.choice(len(data), 40, replace=False):
    bad = tmp_path / "flip.npz"
    bad.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :])
    try:
      assert_same_tree(lab_optax.load_packed(bad), tree)
    except ValueError as e:
      assert "flip.npz" in str(e)
      refused += 1
  assert refused >= 30


def test_checksum_catches_a_consistent_archive_with_changed_data(tmp_path):
  path = tmp_path / "model.npz"
  lab_optax.save_packed(path, mixed_tree())
  with np.load(path) as npz:
    entries = {name: npz[name] for name in npz.files}
  entries["leaf_0"] = entries["leaf_0"].copy()
  entries["leaf_0"].view(np.uint8)[0] ^= 1  # a valid zip: np.savez writes fresh CRCs
  forged = tmp_path / "forged.npz"
  np.savez(forged, **entries)
  with pytest.raises(ValueError, match="forged.npz: checksum mismatch .* corrupted"):
    lab_optax.load_packed(forged)


def test_load_refuses_other_npz_files(tmp_path):
  path = tmp_path / "plain.npz"
  np.savez(path, w=np.ones(3))
  with pytest.raises(ValueError, match="plain.npz: not a lab_optax packed file"):
    lab_optax.load_packed(path)
  with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
    pass
  with pytest.raises(ValueError, match="empty.npz: not a lab_optax packed file"):
    lab_optax.load_packed(tmp_path / "empty.npz")
  with pytest.raises(FileNotFoundError):
    lab_optax.load_packed(tmp_path / "missing.npz")


def test_save_refuses_non_numeric_leaves(tmp_path):
  with pytest.raises(ValueError, match=r"\['name'\]"):
    lab_optax.save_packed(tmp_path / "x.npz", {"name": np.array(["a"])})
  # A model's RNG state (nnx.Rngs keys) is named, with what to save instead.
  with pytest.raises(ValueError, match=r"\['rngs'\]\['key'\]: it is a PRNG key.*nnx.Not"):
    lab_optax.save_packed(
      tmp_path / "x.npz", {"w": jnp.ones(2), "rngs": {"key": jax.random.key(0)}}
    )
  assert os.listdir(tmp_path) == []


def test_pack_refuses_one_row_with_several_magnitudes():
  # One weight per channel: "one alpha per channel" would be the weights themselves.
  with pytest.raises(ValueError, match="not quantized"):
    lab_optax.pack({"w": jnp.array([[0.4, -0.2, 0.3]])})
  with pytest.raises(ValueError, match="not quantized"):
    lab_optax.pack({"w": jnp.array([[0.4, -0.2, 0.3]])}, per_channel=True)
  binary = jnp.array([[0.3, -0.3, 0.3]])
  np.testing.assert_array_equal(lab_optax.unpack(lab_optax.pack({"w": binary}))["w"], binary)

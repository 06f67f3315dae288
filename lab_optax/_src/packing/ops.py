"""Inference from packed kernels: dense and convolution, real or binarized inputs.

Each operation takes a :class:`~lab_optax.PackedBinary` or a
:class:`~lab_optax.PackedQuantized` and computes the layer's product before
its bias:

* real inputs (:func:`binary_dense`, :func:`binary_conv`): the float product
  with the normalized kernel (``{-1, +1}`` or the level set), scaled once per
  output; with two scales, one product per sign.
* binarized inputs (:func:`xnor_dense`, :func:`xnor_conv`): the inputs' signs
  packed to bits, then popcounts against the kernel's bit planes, exact in
  integers before the scales. Binary kernels: ``K - 2 popcount(a XOR b)``
  (:func:`xnor_matmul`). Ternary and linear m-bit kernels: one
  ``popcount((a XOR sign) AND plane)`` per magnitude bit plane, weighted by
  powers of two. Other level sets (logarithmic, two scales): one plane per
  nonzero magnitude (and sign), built from the stored planes with bitwise
  operations.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lab_optax._src.packing.bits import _pack_bool, _unpack_bool, pack_bits, xnor_matmul
from lab_optax._src.packing.leaves import (
  Packed,
  PackedBinary,
  _bit_terms,
  _unit_kernel,
  is_packed,
)


def _check_packed(packed: Any, fn: str) -> None:
  if not is_packed(packed):
    raise TypeError(
      f"{fn} needs a PackedBinary or PackedQuantized from lab_optax.pack, got "
      f"{type(packed).__name__}"
    )


def _out_dtype(x: jax.Array) -> Any:
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _check_features(x: jax.Array, k: int, fn: str) -> None:
  if x.ndim == 0 or x.shape[-1] != k:
    raise ValueError(f"{fn}: the last axis of x must have length {k}, got shape {x.shape}")


def _unit_kernels(packed: Packed) -> list[jax.Array]:
  """The normalized kernels whose products :func:`_scaled` combines, ``(N, K)`` as packed.

  ``[b]`` with ``b`` in {-1, +1} for a binary kernel; ``[levels]`` for one
  scale; the positive and the negative part for two scales.
  """
  if isinstance(packed, PackedBinary):
    bits = _unpack_bool(packed.bits, packed.k)
    return [jnp.where(bits, jnp.float32(1), jnp.float32(-1))]
  sign, unit = _unit_kernel(packed)
  if packed.num_scales == 1:
    return [unit]
  zero = jnp.zeros_like(unit)
  return [jnp.where(sign, unit, zero), jnp.where(sign, zero, unit)]


def _scaled(packed: Packed, parts: Sequence[jax.Array]) -> jax.Array:
  """The products of :func:`_unit_kernels`' kernels (output channels last), scaled."""
  if isinstance(packed, PackedBinary):
    return parts[0] * packed.alpha
  if packed.num_scales == 1:
    return parts[0] * packed.scale
  return parts[0] * packed.scale[0] + parts[1] * packed.scale[1]


def _masked_popcounts(a_bits: jax.Array, masks: jax.Array, xor: jax.Array | None) -> jax.Array:
  """``sum_w popcount((a[m, w] ^ xor[n, w]) & masks[j, n, w])`` as ``(J, M, N)`` int32.

  Without ``xor``: ``popcount(a & mask)``. One pass over the words, as
  :func:`xnor_matmul` (unrolled 8 times), each step one elementwise pass over
  ``(J, M, N)``.
  """
  a_t = a_bits.T  # (W, M)
  m_t = jnp.moveaxis(masks, 2, 0)  # (W, J, N)
  x_t = None if xor is None else xor.T  # (W, N)

  def step(w, acc):
    t = a_t[w][None, :, None]
    if x_t is not None:
      t = t ^ x_t[w][None, None, :]
    return acc + lax.population_count(t & m_t[w][:, None, :])

  words = a_bits.shape[1]
  acc = jnp.zeros((masks.shape[0], a_bits.shape[0], masks.shape[1]), jnp.uint32)
  acc = lax.fori_loop(0, words, step, acc, unroll=max(1, min(8, words)))
  return acc.astype(jnp.int32)


def _popcount(bits: jax.Array) -> jax.Array:
  """Set bits along the last axis (words), int32."""
  return jnp.sum(lax.population_count(bits), axis=-1).astype(jnp.int32)


def _xnor_parts(a_bits: jax.Array, planes: jax.Array, k: int, packed: Packed) -> list[jax.Array]:
  """The products of ``sign(x)`` with :func:`_unit_kernels`' kernels, from bits, ``(M, N)`` each.

  Args:
    a_bits: the packed signs of the inputs, ``(M, W)``.
    planes: the kernel's planes ``(P, N, W)``: its signs, then (ternary and
      m-bit) the bits of the magnitude index, least significant first.
    k: the true reduction length.
    packed: the packed kernel, for its level set (static).
  """
  sign = planes[0]
  if isinstance(packed, PackedBinary):
    return [xnor_matmul(a_bits, sign, k).astype(jnp.float32)]
  index = planes[1:]
  magnitudes = packed.magnitudes
  # Linear levels, as the float path decides it (leaves._bit_terms): first + step * index.
  terms = _bit_terms(magnitudes) if packed.num_scales == 1 else None
  if terms is not None:
    # w = sign * (first + step * sum_j 2^j bit_j): with s = sign(x) * sign(w),
    # sum over a plane of s = popcount(plane) - 2 popcount((a ^ sign) & plane).
    first, step = float(terms[0]), float(terms[1])
    agree = _popcount(index)[:, None, :] - 2 * _masked_popcounts(a_bits, index, sign)
    total = jnp.tensordot(jnp.asarray([2**j for j in range(len(index))], jnp.int32), agree, 1)
    y = step * total.astype(jnp.float32)
    if first:
      y = y + first * xnor_matmul(a_bits, sign, k).astype(jnp.float32)
    return [y]
  # One plane per nonzero magnitude: index == i, as bitwise operations on the words.
  valid = _pack_bool(jnp.ones((k,), jnp.bool_))
  nonzero = [i for i, m in enumerate(magnitudes) if m]
  ones = jnp.uint32(0xFFFFFFFF)
  hits = []
  for i in nonzero:
    hit = jnp.broadcast_to(valid, sign.shape)
    for j in range(len(index)):
      hit = hit & (index[j] if (i >> j) & 1 else index[j] ^ ones)
    hits.append(hit)
  hits = jnp.stack(hits)  # (I, N, W)
  weights = jnp.asarray([magnitudes[i] for i in nonzero], jnp.float32)
  if packed.num_scales == 1:
    agree = _popcount(hits)[:, None, :] - 2 * _masked_popcounts(a_bits, hits, sign)
    return [jnp.tensordot(weights, agree.astype(jnp.float32), 1)]
  # Two scales: sum of x over the positive and over the negative weights of each plane,
  # 2 popcount(a & plane) - popcount(plane); the negative weights are -magnitude.
  parts = []
  for side, factor in ((hits & sign, 1.0), (hits & (sign ^ ones), -1.0)):
    sums = 2 * _masked_popcounts(a_bits, side, None) - _popcount(side)[:, None, :]
    parts.append(factor * jnp.tensordot(weights, sums.astype(jnp.float32), 1))
  return parts


def _planes(packed: Packed) -> jax.Array:
  return packed.bits[None] if isinstance(packed, PackedBinary) else packed.planes


def binary_dense(
  x: jax.typing.ArrayLike, packed: Packed, *, precision: lax.PrecisionLike = None
) -> jax.Array:
  """``x @ w`` for a packed kernel ``w`` (binary, ternary or m-bit) and real ``x``.

  Computes ``alpha * (x @ b)`` in float32 with ``b`` the {-1, +1} matrix
  unpacked from the bits (for a :class:`PackedQuantized`, ``b`` holds the
  normalized levels and ``alpha`` is its scale; with two scales, one product
  per sign), so one multiplication by the scale per output instead of per
  weight. This is the inference of a quantized Dense layer (LAB, BWN,
  BinaryConnect, LAT, LAQ, ...) before its bias.

  Args:
    x: real inputs of shape ``(..., K)``.
    packed: a :class:`PackedBinary` or :class:`PackedQuantized` whose leaf had
      shape ``(K, N)`` (or any shape with ``prod(shape[:-1]) == K``).
    precision: passed to :func:`jax.numpy.matmul`.

  Returns:
    An array of shape ``(..., N)`` in ``x``'s dtype (float32 for integer
    ``x``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> w = jnp.array([[0.5, -0.5], [0.5, 0.5]])
    >>> packed = lab_optax.pack({"w": w})["w"]
    >>> lab_optax.binary_dense(jnp.array([[1.0, 2.0]]), packed)
    Array([[1.5, 0.5]], dtype=float32)
    >>> ternary = lab_optax.pack({"w": jnp.array([[0.5, 0.0], [-0.5, 0.5]])})["w"]
    >>> lab_optax.binary_dense(jnp.array([[1.0, 2.0]]), ternary)
    Array([[-0.5,  1. ]], dtype=float32)
  """
  _check_packed(packed, "binary_dense")
  x = jnp.asarray(x)
  _check_features(x, packed.k, "binary_dense")
  x32 = x.astype(jnp.float32)
  # Contracting the kernels' K axis where it is (no transpose of the unpacked bits).
  dims = (((x32.ndim - 1,), (1,)), ((), ()))
  parts = [lax.dot_general(x32, u, dims, precision=precision) for u in _unit_kernels(packed)]
  return _scaled(packed, parts).astype(_out_dtype(x))


def xnor_dense(x: jax.typing.ArrayLike, packed: Packed) -> jax.Array:
  """``sign(x) @ w`` for a packed kernel, by XNOR and popcount.

  For binarized activations (LAB2, BNN, XNOR-Net), ``x`` in {-1, +1}: the rows
  of ``x`` are packed with :func:`pack_bits` and multiplied with the kernel's
  bits: :func:`xnor_matmul` for a binary kernel, one popcount per bit plane for
  a ternary or m-bit one (see the module's docstring); the integer counts are
  exact and the scales multiply them once. Entries of ``x`` that are not +-1
  are binarized first (``x >= 0`` gives +1), so this equals
  ``binary_dense(binary_sign(x), packed)`` up to rounding (exactly, for
  binary kernels).

  Args:
    x: activations of shape ``(..., K)``, normally in {-1, +1}.
    packed: a :class:`PackedBinary` or :class:`PackedQuantized` with
      ``packed.k == K``.

  Returns:
    ``sign(x) @ w`` of shape ``(..., N)`` in ``x``'s dtype (float32 for
    integer ``x``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> w = jnp.array([[0.5, -0.5], [0.5, 0.5]])
    >>> packed = lab_optax.pack({"w": w})["w"]
    >>> lab_optax.xnor_dense(jnp.array([[1.0, -1.0]]), packed)
    Array([[ 0., -1.]], dtype=float32)
    >>> ternary = lab_optax.pack({"w": jnp.array([[0.5, 0.0], [-0.5, 0.5]])})["w"]
    >>> lab_optax.xnor_dense(jnp.array([[1.0, -1.0]]), ternary)
    Array([[ 1. , -0.5]], dtype=float32)
  """
  _check_packed(packed, "xnor_dense")
  x = jnp.asarray(x)
  _check_features(x, packed.k, "xnor_dense")
  a_bits = pack_bits(x.reshape(-1, packed.k))
  y = _scaled(packed, _xnor_parts(a_bits, _planes(packed), packed.k, packed))
  return y.reshape(*x.shape[:-1], packed.n).astype(_out_dtype(x))


def _tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name} must have {n} entries for a {n}-D convolution, got {value}")
  return value


def normalize_padding(padding: Any, n: int) -> str | tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or pairs, got {padding!r}")
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * n
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != n or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must give one (low, high) pair per spatial axis, got {padding!r}")
  return pads


def _dimension_numbers(x_shape, kernel_shape) -> lax.ConvDimensionNumbers:
  # NHWC inputs and HWIO kernels, as flax.nnx.Conv, for any number of spatial axes.
  spatial = "".join(chr(ord("a") + i) for i in range(len(kernel_shape) - 2))
  specs = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  return lax.conv_dimension_numbers(x_shape, kernel_shape, specs)


@dataclasses.dataclass(frozen=True)
class _ConvArgs:
  strides: tuple[int, ...]
  padding: Any
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int
  dimension_numbers: lax.ConvDimensionNumbers


def _conv_setup(x, packed, fn, strides, padding, input_dilation, kernel_dilation, groups):
  _check_packed(packed, fn)
  n = len(packed.shape) - 2
  if n < 1:
    raise ValueError(f"{fn} needs a kernel of shape (*kernel_size, in, out), got {packed.shape}")
  x = jnp.asarray(x)
  in_features = packed.shape[-2] * groups
  if x.ndim < n + 1 or x.shape[-1] != in_features:
    raise ValueError(
      f"{fn}: x must have shape (batch..., *spatial, {in_features}) with {n} spatial axes, "
      f"got {x.shape}"
    )
  if packed.n % groups:
    raise ValueError(f"{fn}: {packed.n} output features do not split into {groups} groups")
  batch_shape = x.shape[: x.ndim - n - 1]
  x = x.reshape(-1, *x.shape[x.ndim - n - 1 :])
  args = _ConvArgs(
    strides=_tuple(strides, n, "strides"),
    padding=normalize_padding(padding, n),
    input_dilation=_tuple(input_dilation, n, "input_dilation"),
    kernel_dilation=_tuple(kernel_dilation, n, "kernel_dilation"),
    groups=groups,
    dimension_numbers=_dimension_numbers(x.shape, packed.shape),
  )
  return x, batch_shape, args


def _conv(x: jax.Array, kernel: jax.Array, args: _ConvArgs, precision: Any) -> jax.Array:
  return lax.conv_general_dilated(
    x,
    kernel,
    window_strides=args.strides,
    padding=args.padding,
    lhs_dilation=args.input_dilation,
    rhs_dilation=args.kernel_dilation,
    dimension_numbers=args.dimension_numbers,
    feature_group_count=args.groups,
    precision=precision,
  )


def binary_conv(
  x: jax.typing.ArrayLike,
  packed: Packed,
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
  input_dilation: int | Sequence[int] = 1,
  kernel_dilation: int | Sequence[int] = 1,
  feature_group_count: int = 1,
  precision: lax.PrecisionLike = None,
) -> jax.Array:
  """Convolution of real ``x`` with a packed kernel ``alpha * b`` (binary, ternary or m-bit).

  Computes ``alpha * conv(x, b)`` in float32, ``b`` being the {-1, +1} kernel
  unpacked from the bits (the normalized levels of a :class:`PackedQuantized`,
  one convolution per sign with two scales), with the conventions of ``flax.nnx.Conv`` (inputs
  ``(batch..., *spatial, in)``, kernel ``(*kernel_size, in // groups, out)``),
  before the bias. The float convolution of XLA is the fastest way to apply
  a {-1, +1} kernel to real inputs; :func:`xnor_conv` is the bit path for
  binarized inputs.

  Args:
    x: inputs ``(batch..., *spatial, in_features)``; without batch axes a
      single example.
    packed: a :class:`PackedBinary` or :class:`PackedQuantized` of a kernel
      ``(*kernel_size, in // groups, out)``.
    strides: an int or one int per spatial axis.
    padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, an int, or one int or
      ``(low, high)`` pair per spatial axis; padding is with zeros.
    input_dilation: an int or one per spatial axis.
    kernel_dilation: an int or one per spatial axis.
    feature_group_count: number of feature groups.
    precision: passed to :func:`jax.lax.conv_general_dilated`.

  Returns:
    An array ``(batch..., *out_spatial, out)`` in ``x``'s dtype (float32 for
    integer ``x``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> kernel = jnp.full((3, 3, 1, 2), 0.5).at[..., 1].multiply(-1)
    >>> packed = lab_optax.pack({"k": kernel})["k"]
    >>> y = lab_optax.binary_conv(jnp.ones((1, 4, 4, 1)), packed, padding="VALID")
    >>> y.shape, y[0, 0, 0]
    ((1, 2, 2, 2), Array([ 4.5, -4.5], dtype=float32))
  """
  x = jnp.asarray(x)
  out_dtype = _out_dtype(x)
  x4, batch_shape, args = _conv_setup(
    x, packed, "binary_conv", strides, padding, input_dilation, kernel_dilation, feature_group_count
  )
  x32 = x4.astype(jnp.float32)
  parts = [_conv(x32, u.T.reshape(packed.shape), args, precision) for u in _unit_kernels(packed)]
  y = _scaled(packed, parts)
  return y.reshape(*batch_shape, *y.shape[1:]).astype(out_dtype)


def _has_holes(x: jax.Array, packed: Packed, args: _ConvArgs) -> bool:
  """Whether some patch entries are padding or input-dilation zeros."""
  if any(d > 1 for d in args.input_dilation):
    return True
  padding = args.padding
  if isinstance(padding, str):  # as lax.conv_general_dilated resolves it
    kernel_size = [(s - 1) * d + 1 for s, d in zip(packed.shape[:-2], args.kernel_dilation)]
    padding = lax.padtype_to_pads(x.shape[1:-1], kernel_size, args.strides, padding)
  return any(p > 0 for pair in padding for p in pair)


def xnor_conv(
  x: jax.typing.ArrayLike,
  packed: Packed,
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
  input_dilation: int | Sequence[int] = 1,
  kernel_dilation: int | Sequence[int] = 1,
  feature_group_count: int = 1,
) -> jax.Array:
  """Convolution of binarized ``sign(x)`` with a packed kernel, by XNOR and popcount.

  The patches of ``sign(x)`` (:func:`jax.lax.conv_general_dilated_patches`)
  are packed and multiplied with the kernel's bits by :func:`xnor_matmul` (a
  binary kernel) or by one popcount per bit plane (ternary and m-bit: see
  :func:`xnor_dense`); the integer counts are exact and the scales multiply
  them once. The output equals the
  float convolution ``alpha * conv(sign(x), b)`` with zero padding, as
  ``flax.nnx.Conv`` computes it during training: a padded zero is neither +1
  nor -1, so the patches count it as +1 and the exact contribution of the
  kernel entries that fall on padding is subtracted afterwards (an integer
  map computed once from a batch-1 image of ones).

  Patches order their features channel-major, ``(in, *kernel_size)``, while
  the packed kernel is ``kernel.reshape(K, N)`` (spatial-major); the kernel's
  bit planes are repacked in the patches' order, which costs ``K * N`` bits per
  plane and call instead of reordering the much larger patches.

  Args:
    x: activations ``(batch..., *spatial, in_features)``, normally in
      {-1, +1}; other values are binarized with ``x >= 0 -> +1``.
    packed: a :class:`PackedBinary` or :class:`PackedQuantized` of a kernel
      ``(*kernel_size, in // groups, out)``.
    strides: an int or one int per spatial axis.
    padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, an int, or one int or
      ``(low, high)`` pair per spatial axis; padding is with zeros.
    input_dilation: an int or one per spatial axis.
    kernel_dilation: an int or one per spatial axis.
    feature_group_count: number of feature groups.

  Returns:
    ``alpha * conv(sign(x), b)`` of shape ``(batch..., *out_spatial, out)`` in
    ``x``'s dtype (float32 for integer ``x``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> kernel = jnp.full((3, 3, 1, 2), 0.5).at[..., 1].multiply(-1)
    >>> packed = lab_optax.pack({"k": kernel})["k"]
    >>> y = lab_optax.xnor_conv(jnp.ones((1, 4, 4, 1)), packed)  # 'SAME': corners see 4 taps
    >>> y[0, 0, 0], y[0, 1, 1]
    (Array([ 2., -2.], dtype=float32), Array([ 4.5, -4.5], dtype=float32))
  """
  x = jnp.asarray(x)
  out_dtype = _out_dtype(x)
  x4, batch_shape, args = _conv_setup(
    x, packed, "xnor_conv", strides, padding, input_dilation, kernel_dilation, feature_group_count
  )
  n_spatial = len(packed.shape) - 2
  kernel_size = packed.shape[:n_spatial]
  taps, cin, n = math.prod(kernel_size), packed.shape[-2], packed.n
  groups, k = args.groups, packed.k
  # Signs first: +-1 and the zeros of padding survive the patch convolution exactly
  # at any precision, and the zeros pack as +1 (corrected below).
  signs = jnp.where(x4 >= 0, jnp.float32(1), jnp.float32(-1))
  patches = lax.conv_general_dilated_patches(
    signs,
    filter_shape=kernel_size,
    window_strides=args.strides,
    padding=args.padding,
    lhs_dilation=args.input_dilation,
    rhs_dilation=args.kernel_dilation,
    dimension_numbers=args.dimension_numbers,
  )
  out_spatial = patches.shape[1:-1]
  # (examples * positions, groups, in // groups * taps): each group's features are contiguous.
  a_bits = pack_bits(patches.reshape(-1, groups, k))

  def patch_order(plane):
    bits = _unpack_bool(plane, k).reshape(n, taps, cin)
    return _pack_bool(jnp.swapaxes(bits, 1, 2).reshape(groups, n // groups, k))

  planes = jnp.stack([patch_order(plane) for plane in _planes(packed)], axis=1)  # (G, P, N/G, W)
  per_group = jax.vmap(lambda a, p: _xnor_parts(a, p, k, packed), in_axes=(1, 0))(a_bits, planes)
  parts = [jnp.moveaxis(part, 0, 1).reshape(x4.shape[0], -1, n) for part in per_group]
  if _has_holes(x4, packed, args):
    # The patches counted each padded zero as +1; remove each kernel's sum over
    # those taps: its total sum minus its sum over the real pixels (a conv of ones).
    ones = jnp.ones((1, *x4.shape[1:]), jnp.float32)
    for i, unit in enumerate(_unit_kernels(packed)):
      inside = _conv(ones, unit.T.reshape(packed.shape), args, lax.Precision.HIGHEST)
      parts[i] = parts[i] - (jnp.sum(unit, axis=1) - inside.reshape(1, -1, n))
  y = _scaled(packed, parts)
  return y.reshape(*batch_shape, *out_spatial, n).astype(out_dtype)

"""1-bit packing of binarized weights, XNOR-popcount products and a packed file format.

Params trained with lab_optax hold ``alpha * sign(latent)``: every binarized
leaf has exactly two values ``+-alpha`` (or ``+-alpha_j`` per output channel).
This module stores such a leaf as one bit per weight plus its alpha, and runs
inference on the packed form:

* :func:`pack_bits` packs signs along the last axis, 32 to a ``uint32`` word;
  :func:`xnor_matmul` multiplies two packed {-1, +1} matrices exactly with
  ``K - 2 * popcount(a XOR b)``.
* :func:`pack` / :func:`unpack` turn a params pytree into one whose binarized
  leaves are :class:`PackedBinary` and back, bit for bit.
* :func:`binary_dense`, :func:`xnor_dense`, :func:`binary_conv` and
  :func:`xnor_conv` compute a layer's output from a :class:`PackedBinary`.
* :func:`save_packed` / :func:`load_packed` write and read one ``.npz`` file
  with a checksum.

Bit layout: element ``i`` of the packed axis is bit ``i % 32`` (least
significant first) of word ``i // 32``; a set bit means ``x >= 0``, i.e.
``binary_sign(x) = +1``. When the axis length ``K`` is not a multiple of 32 the
last word is padded with zero bits. Both operands of :func:`xnor_matmul` come
from :func:`pack_bits`, so their padding bits are equal, their XOR is 0 and the
padding adds nothing to the popcount: ``K - 2 * popcount`` with the true ``K``
is exact whatever the padding length.
"""

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lab_optax._src import masks as masks_lib

_WORD = 32
_FORMAT = "lab_optax.packed"
_VERSION = 1
_META_KEY = "__meta__"


# ---------------------------------------------------------------------------
# Bits.


def _pack_bool(bits: jax.Array) -> jax.Array:
  """Packs a boolean array along its last axis into uint32 words (LSB first)."""
  k = bits.shape[-1]
  words = -(-k // _WORD)
  pad = words * _WORD - k
  if pad:
    # Zero padding bits: see the module docstring for why they never count.
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
  bits = bits.reshape(*bits.shape[:-1], words, _WORD).astype(jnp.uint32)
  shifts = jnp.arange(_WORD, dtype=jnp.uint32)
  # The shifted bits are disjoint, so their sum is their bitwise OR.
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def _unpack_bool(words: jax.Array, k: int) -> jax.Array:
  """Inverse of :func:`_pack_bool`: the first ``k`` bits along the last axis."""
  shifts = jnp.arange(_WORD, dtype=jnp.uint32)
  bits = (words[..., None] >> shifts) & jnp.uint32(1)
  bits = bits.reshape(*words.shape[:-1], words.shape[-1] * _WORD)
  return bits[..., :k].astype(jnp.bool_)


def pack_bits(x: jax.typing.ArrayLike) -> jax.Array:
  """Packs the signs of ``x`` along its last axis, 32 to a ``uint32`` word.

  Bit ``i % 32`` of word ``i // 32`` is 1 where ``x[..., i] >= 0`` (so
  ``sign(0) = +1`` and NaN counts as negative, as in
  :func:`lab_optax.binary_sign`). A last axis of length ``K`` that is not a
  multiple of 32 is padded with zero bits; since every packed operand is padded
  the same way, the padding never changes :func:`xnor_matmul`.

  Args:
    x: a real array of shape ``(..., K)``.

  Returns:
    A ``uint32`` array of shape ``(..., ceil(K / 32))``.

  Raises:
    ValueError: if ``x`` is a scalar or has a boolean or complex dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import pack_bits
    >>> pack_bits(jnp.array([1.0, -2.0, 0.0, -0.5]))  # bits 0 and 2 set
    Array([5], dtype=uint32)
    >>> pack_bits(jnp.ones((3, 33))).shape
    (3, 2)
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("pack_bits needs an array with at least one axis, got a scalar")
  if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(f"pack_bits packs the signs of a real array, got dtype {x.dtype}")
  return _pack_bool(x >= 0)


def _check_k(k: Any, words: int) -> None:
  """Checks a concrete ``k`` against the number of packed words."""
  if isinstance(k, jax.core.Tracer):
    return
  try:
    value = int(k)
  except TypeError:
    raise ValueError(f"k must be an integer scalar, got {k!r}") from None
  if not (words - 1) * _WORD < value <= words * _WORD and not value == words == 0:
    raise ValueError(
      f"k = {value} does not fit {words} packed word(s): it must be in "
      f"({max(words - 1, 0) * _WORD}, {words * _WORD}]"
    )


def xnor_matmul(
  a_bits: jax.typing.ArrayLike, b_bits: jax.typing.ArrayLike, k: int | jax.Array
) -> jax.Array:
  r"""Exact product of two packed {-1, +1} matrices by XNOR and popcount.

  With ``A`` of shape ``(M, K)`` and ``B`` of shape ``(K, N)``, both in
  {-1, +1}, ``a_bits = pack_bits(A)`` and ``b_bits = pack_bits(B.T)``:

  .. math::

    (A B)_{mn} = K - 2 \sum_w \mathrm{popcount}(a_{mw} \oplus b_{nw}),

  since every agreeing bit contributes +1 and every differing bit -1.

  The loop runs over words, each step adding ``popcount(a[:, w, None] ^
  b[None, :, w])`` to an ``(M, N)`` ``uint32`` accumulator, unrolled 8 times:
  every step is one elementwise pass over ``(M, N)``. On XLA:CPU that was
  several times faster than broadcasting to ``(M, N, W)`` and reducing the
  minor axis, and than the same loop without unrolling (figures in
  ``docs/results.md``, from ``benchmarks/bench_packing.py``).

  Args:
    a_bits: ``uint32`` array of shape ``(M, W)``, ``W = ceil(K / 32)``.
    b_bits: ``uint32`` array of shape ``(N, W)`` (packed along ``K`` too).
    k: the true reduction length ``K``. A Python int or an integer scalar
      array; it only enters the final ``K - 2 * popcount``, so it may also be
      traced under :func:`jax.jit` (a concrete ``k`` is checked against
      ``W``; a traced one cannot be).

  Returns:
    The ``int32`` matrix ``A @ B`` of shape ``(M, N)``.

  Raises:
    ValueError: for operands that are not 2-D ``uint32`` arrays with the same
      number of words, or a concrete ``k`` that does not fit ``W`` words.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import pack_bits, xnor_matmul
    >>> a = jnp.array([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])
    >>> b = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])
    >>> xnor_matmul(pack_bits(a), pack_bits(b.T), k=3)
    Array([[-1,  3],
           [-3,  1]], dtype=int32)
    >>> a @ b
    Array([[-1.,  3.],
           [-3.,  1.]], dtype=float32)
  """
  a_bits, b_bits = jnp.asarray(a_bits), jnp.asarray(b_bits)
  if a_bits.ndim != 2 or b_bits.ndim != 2:
    raise ValueError(
      f"xnor_matmul needs 2-D packed operands (M, W) and (N, W), got shapes "
      f"{a_bits.shape} and {b_bits.shape}"
    )
  if a_bits.dtype != jnp.uint32 or b_bits.dtype != jnp.uint32:
    raise ValueError(
      f"xnor_matmul needs uint32 operands from pack_bits, got {a_bits.dtype} and {b_bits.dtype}"
    )
  words = a_bits.shape[1]
  if b_bits.shape[1] != words:
    raise ValueError(
      f"operands are packed over different lengths: {words} and {b_bits.shape[1]} words"
    )
  _check_k(k, words)
  # Word-major operands make a[w] and b[w] contiguous rows for each loop step.
  a_t, b_t = a_bits.T, b_bits.T

  def step(w, acc):
    return acc + lax.population_count(a_t[w][:, None] ^ b_t[w][None, :])

  acc = jnp.zeros((a_bits.shape[0], b_bits.shape[0]), jnp.uint32)
  acc = lax.fori_loop(0, words, step, acc, unroll=max(1, min(8, words)))
  return jnp.asarray(k, jnp.int32) - 2 * acc.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Packed leaves.


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=("bits", "alpha"), meta_fields=("shape", "dtype")
)
@dataclasses.dataclass(frozen=True)
class PackedBinary:
  """One binarized weight tensor, one bit per weight plus its scale.

  A leaf ``w`` of shape ``(*in_axes, N)`` is viewed as the matrix
  ``w.reshape(K, N)`` with ``K = prod(in_axes)`` (the reduction axes of a Dense,
  Conv or recurrent kernel) and packed along ``K``:
  ``bits = pack_bits(w.reshape(K, N).T)``. It is a pytree: ``bits`` and
  ``alpha`` are children, ``shape`` and ``dtype`` static metadata, so a
  :class:`PackedBinary` passes through :func:`jax.jit`.
  """

  bits: jax.Array  # uint32, shape (N, ceil(K / 32)): signs packed along K.
  alpha: jax.Array  # float32, shape () per tensor or (N,) per output channel.
  shape: tuple[int, ...]  # shape of the original leaf.
  dtype: str  # dtype name of the original leaf, e.g. "float32" or "bfloat16".

  @property
  def k(self) -> int:
    """The reduction length: product of all axes but the last."""
    return math.prod(self.shape[:-1])

  @property
  def n(self) -> int:
    """The number of output channels: the last axis."""
    return self.shape[-1]


def _is_packed(x: Any) -> bool:
  return isinstance(x, PackedBinary)


def _signs(packed: PackedBinary) -> jax.Array:
  """The {-1, +1} float32 matrix of shape ``(K, N)`` held by ``packed``."""
  bits = _unpack_bool(packed.bits, packed.k)
  return jnp.where(bits, jnp.float32(1), jnp.float32(-1)).T


def _pack_leaf(x: Any, name: str, per_channel: bool | None) -> PackedBinary:
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"cannot pack the scalar leaf at {name}: binarized leaves need an axis")
  n = x.shape[-1]
  mat = x.reshape(math.prod(x.shape[:-1]), n)
  concrete = not isinstance(x, jax.core.Tracer)
  if per_channel is None:
    if not concrete:
      raise ValueError(
        f"pack detects per-tensor or per-channel alpha from the values of {name}, which are "
        "traced here; under jax.jit pass per_channel=True or per_channel=False"
      )
    per_channel = _detect_layout(np.asarray(mat), name)
  elif concrete:
    _check_layout(np.asarray(mat), name, per_channel)
  bits, alpha = _pack_matrix(mat, per_channel)
  return PackedBinary(bits=bits, alpha=alpha, shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name)


# Jitted so that packing a model eagerly costs one compilation per leaf shape.
@functools.partial(jax.jit, static_argnames="per_channel")
def _pack_matrix(mat: jax.Array, per_channel: bool) -> tuple[jax.Array, jax.Array]:
  mags = jnp.abs(mat).astype(jnp.float32)
  if mat.size == 0:
    alpha = jnp.zeros(mat.shape[-1:] if per_channel else (), jnp.float32)
  else:
    # All magnitudes of a slice are equal (checked by the caller), so max picks alpha.
    alpha = jnp.max(mags, axis=0) if per_channel else jnp.max(mags)
  # The sign bit, not x >= 0, so that -0.0 (alpha = 0) also comes back bit for bit.
  return _pack_bool(~jnp.signbit(mat.T)), alpha


def _layout_error(name: str, mags: np.ndarray) -> ValueError:
  count = len(np.unique(mags))
  return ValueError(
    f"the leaf at {name} is not binarized: it holds {count} distinct magnitudes, "
    "not one per tensor or one per output channel (last axis); pass the params returned "
    "by lab_optax.binarize_params or optax.apply_updates, or leave this leaf out of the mask"
  )


def _uniform(mags: np.ndarray, axis: int | None) -> np.ndarray | bool:
  # NaN compares unequal, so a NaN leaf is never taken for binarized.
  return np.all(mags.max(axis=axis) == mags.min(axis=axis), axis=None)


def _detect_layout(mat: np.ndarray, name: str) -> bool:
  """``False`` for one alpha per tensor, ``True`` for one per output channel."""
  if mat.size == 0:
    return False
  mags = np.abs(mat.astype(np.float32))
  if _uniform(mags, None):
    return False
  if len(mags) > 1 and _uniform(mags, 0):  # one weight per channel is not binarized
    return True
  raise _layout_error(name, mags)


def _check_layout(mat: np.ndarray, name: str, per_channel: bool) -> None:
  if mat.size == 0:
    return
  mags = np.abs(mat.astype(np.float32))
  if per_channel and len(mags) < 2 and not _uniform(mags, None):
    raise _layout_error(name, mags)
  if not _uniform(mags, 0 if per_channel else None):
    if not per_channel and _uniform(mags, 0):
      raise ValueError(
        f"the leaf at {name} has one alpha per output channel, but per_channel=False was given"
      )
    raise _layout_error(name, mags)


def pack(params: Any, mask: masks_lib.MaskOrFn = None, *, per_channel: bool | None = None) -> Any:
  """Replaces every binarized leaf of ``params`` by a :class:`PackedBinary`.

  A selected leaf must hold binarized weights, ``alpha * sign(w)``: one
  magnitude per tensor, or one per output channel (last axis). Which of the two
  is read from the values unless ``per_channel`` says it. Unselected leaves are
  returned as they are. :func:`unpack` inverts this exactly.

  Args:
    params: a pytree of arrays holding binarized weights (the params that
      lab_optax's transformations write; dicts, lists, tuples, ``nnx.State``).
    mask: ``None`` selects every floating leaf with ``ndim >= 2`` (as
      :func:`lab_optax.default_mask`); otherwise a pytree of bools with the
      structure of ``params``, or a callable ``params -> such a pytree``. Use
      the mask given to the optimizer.
    per_channel: ``None`` detects the alpha layout of each leaf from its
      values, which needs concrete arrays. Under :func:`jax.jit` pass ``True``
      (one alpha per output channel) or ``False`` (one per tensor); traced
      values cannot be checked, so a leaf that is not binarized then packs to
      the largest magnitude with the signs of its entries.

  Returns:
    A pytree with the structure of ``params`` in which every selected leaf is a
    :class:`PackedBinary`.

  Raises:
    ValueError: if a selected leaf is not binarized (its path is named), is a
      scalar, or does not match the given ``per_channel``; or if the mask is
      invalid (see :func:`lab_optax.default_mask`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> params = {"kernel": jnp.array([[0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]),
    ...           "bias": jnp.array([0.1, -0.2])}
    >>> packed = lab_optax.pack(params)
    >>> packed["kernel"].bits, packed["kernel"].alpha  # columns (+,-,+) and (-,+,+)
    (Array([[5],
           [6]], dtype=uint32), Array(0.5, dtype=float32))
    >>> bool((lab_optax.unpack(packed)["kernel"] == params["kernel"]).all())
    True
  """
  flags = masks_lib.resolve_mask(mask, params)

  def one(path, p, selected):
    if not selected:
      return p
    return _pack_leaf(p, jax.tree_util.keystr(path) or "<root>", per_channel)

  return jax.tree_util.tree_map_with_path(one, params, flags)


@jax.jit
def _unpack_leaf(packed: PackedBinary) -> jax.Array:
  w = _signs(packed) * packed.alpha
  return w.astype(jnp.dtype(packed.dtype)).reshape(packed.shape)


def unpack(packed: Any) -> Any:
  """Turns every :class:`PackedBinary` of a pytree back into its array.

  The result equals the params given to :func:`pack` bit for bit, with the same
  shapes and dtypes: ``alpha * sign`` is exact in float32 and ``alpha`` was read
  from values of the original dtype. Works under :func:`jax.jit`.

  Args:
    packed: a pytree returned by :func:`pack` or :func:`load_packed`.

  Returns:
    The pytree with each :class:`PackedBinary` replaced by a ``jax.Array`` of
    its original shape and dtype; other leaves are returned as they are.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> w = jnp.array([[0.25, -0.25], [-0.25, 0.25]], jnp.bfloat16)
    >>> lab_optax.unpack(lab_optax.pack({"w": w}))["w"]
    Array([[0.25, -0.25],
           [-0.25, 0.25]], dtype=bfloat16)
  """
  return jax.tree.map(lambda x: _unpack_leaf(x) if _is_packed(x) else x, packed, is_leaf=_is_packed)


# ---------------------------------------------------------------------------
# Inference helpers.


def _check_packed(packed: Any, fn: str) -> None:
  if not _is_packed(packed):
    raise TypeError(f"{fn} needs a PackedBinary from lab_optax.pack, got {type(packed).__name__}")


def _out_dtype(x: jax.Array) -> Any:
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _check_features(x: jax.Array, k: int, fn: str) -> None:
  if x.ndim == 0 or x.shape[-1] != k:
    raise ValueError(f"{fn}: the last axis of x must have length {k}, got shape {x.shape}")


def binary_dense(
  x: jax.typing.ArrayLike, packed: PackedBinary, *, precision: lax.PrecisionLike = None
) -> jax.Array:
  """``x @ w`` for a packed binarized kernel ``w = alpha * b`` and real ``x``.

  Computes ``alpha * (x @ b)`` in float32 with ``b`` the {-1, +1} matrix
  unpacked from the bits, so one multiplication by alpha per output instead of
  per weight. This is the inference of a binarized Dense layer (LAB, BWN,
  BinaryConnect) before its bias.

  Args:
    x: real inputs of shape ``(..., K)``.
    packed: a :class:`PackedBinary` whose leaf had shape ``(K, N)`` (or any
      shape with ``prod(shape[:-1]) == K``).
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
  """
  _check_packed(packed, "binary_dense")
  x = jnp.asarray(x)
  _check_features(x, packed.k, "binary_dense")
  y = jnp.matmul(x.astype(jnp.float32), _signs(packed), precision=precision)
  return (y * packed.alpha).astype(_out_dtype(x))


def xnor_dense(x: jax.typing.ArrayLike, packed: PackedBinary) -> jax.Array:
  """``sign(x) @ w`` for a packed kernel, by XNOR and popcount.

  For binarized activations (LAB2, BNN, XNOR-Net), ``x`` in {-1, +1}: the rows
  of ``x`` are packed with :func:`pack_bits` and multiplied with
  :func:`xnor_matmul`, whose ``int32`` result is exact; alpha scales it once.
  Entries of ``x`` that are not +-1 are binarized first (``x >= 0`` gives +1),
  so this equals ``binary_dense(binary_sign(x), packed)``.

  Args:
    x: activations of shape ``(..., K)``, normally in {-1, +1}.
    packed: a :class:`PackedBinary` with ``packed.k == K``.

  Returns:
    ``alpha * (sign(x) @ b)`` of shape ``(..., N)`` in ``x``'s dtype (float32
    for integer ``x``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> w = jnp.array([[0.5, -0.5], [0.5, 0.5]])
    >>> packed = lab_optax.pack({"w": w})["w"]
    >>> lab_optax.xnor_dense(jnp.array([[1.0, -1.0]]), packed)
    Array([[ 0., -1.]], dtype=float32)
  """
  _check_packed(packed, "xnor_dense")
  x = jnp.asarray(x)
  _check_features(x, packed.k, "xnor_dense")
  a_bits = pack_bits(x.reshape(-1, packed.k))
  y = xnor_matmul(a_bits, packed.bits, packed.k).astype(jnp.float32) * packed.alpha
  return y.reshape(*x.shape[:-1], packed.n).astype(_out_dtype(x))


def _tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name} must have {n} entries for a {n}-D convolution, got {value}")
  return value


def _padding(padding: Any, n: int) -> str | tuple[tuple[int, int], ...]:
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


def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
  # NHWC inputs and HWIO kernels, as flax.nnx.Conv, for any number of spatial axes.
  spatial = tuple(range(1, n + 1))
  return lax.ConvDimensionNumbers(
    lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)), out_spec=(0, n + 1, *spatial)
  )


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
    padding=_padding(padding, n),
    input_dilation=_tuple(input_dilation, n, "input_dilation"),
    kernel_dilation=_tuple(kernel_dilation, n, "kernel_dilation"),
    groups=groups,
    dimension_numbers=_dimension_numbers(n),
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
  packed: PackedBinary,
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
  input_dilation: int | Sequence[int] = 1,
  kernel_dilation: int | Sequence[int] = 1,
  feature_group_count: int = 1,
  precision: lax.PrecisionLike = None,
) -> jax.Array:
  """Convolution of real ``x`` with a packed binarized kernel ``alpha * b``.

  Computes ``alpha * conv(x, b)`` in float32, ``b`` being the {-1, +1} kernel
  unpacked from the bits, with the conventions of ``flax.nnx.Conv`` (inputs
  ``(batch..., *spatial, in)``, kernel ``(*kernel_size, in // groups, out)``),
  before the bias. The float convolution of XLA is the fastest way to apply
  a {-1, +1} kernel to real inputs; :func:`xnor_conv` is the bit path for
  binarized inputs.

  Args:
    x: inputs ``(batch..., *spatial, in_features)``; without batch axes a
      single example.
    packed: a :class:`PackedBinary` of a kernel ``(*kernel_size, in // groups,
      out)``.
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
  kernel = _signs(packed).reshape(packed.shape)
  y = _conv(x4.astype(jnp.float32), kernel, args, precision) * packed.alpha
  return y.reshape(*batch_shape, *y.shape[1:]).astype(out_dtype)


def _has_holes(args: _ConvArgs) -> bool:
  """Whether some patch entries are padding or input-dilation zeros."""
  if any(d > 1 for d in args.input_dilation):
    return True
  if isinstance(args.padding, str):
    return args.padding != "VALID"
  return any(p > 0 for pair in args.padding for p in pair)


def xnor_conv(
  x: jax.typing.ArrayLike,
  packed: PackedBinary,
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
  input_dilation: int | Sequence[int] = 1,
  kernel_dilation: int | Sequence[int] = 1,
  feature_group_count: int = 1,
) -> jax.Array:
  """Convolution of binarized ``sign(x)`` with a packed kernel, by XNOR and popcount.

  The patches of ``sign(x)`` (:func:`jax.lax.conv_general_dilated_patches`)
  are packed and multiplied with the kernel's bits by :func:`xnor_matmul`; the
  ``int32`` result is exact and alpha scales it once. The output equals the
  float convolution ``alpha * conv(sign(x), b)`` with zero padding, as
  ``flax.nnx.Conv`` computes it during training: a padded zero is neither +1
  nor -1, so the patches count it as +1 and the exact contribution of the
  kernel entries that fall on padding is subtracted afterwards (an integer
  map computed once from a batch-1 image of ones).

  Patches order their features channel-major, ``(in, *kernel_size)``, while
  the packed kernel is ``kernel.reshape(K, N)`` (spatial-major); the kernel's
  bits are repacked in the patches' order, which costs ``K * N`` bits per call
  instead of reordering the much larger patches.

  Args:
    x: activations ``(batch..., *spatial, in_features)``, normally in
      {-1, +1}; other values are binarized with ``x >= 0 -> +1``.
    packed: a :class:`PackedBinary` of a kernel ``(*kernel_size, in // groups,
      out)``.
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
  kernel = _unpack_bool(packed.bits, k).reshape(n, taps, cin)
  kernel = jnp.swapaxes(kernel, 1, 2).reshape(groups, n // groups, k)
  b_bits = _pack_bool(kernel)
  per_group = jax.vmap(xnor_matmul, in_axes=(1, 0, None))(a_bits, b_bits, k)
  y = jnp.moveaxis(per_group, 0, 1).reshape(x4.shape[0], -1, n)
  if _has_holes(args):
    # The patches counted each padded zero as +1; remove sum(b) over those taps:
    # total column sum minus its sum over the real pixels (a conv of ones).
    signs_kernel = _signs(packed)
    ones = jnp.ones((1, *x4.shape[1:]), jnp.float32)
    inside = _conv(ones, signs_kernel.reshape(packed.shape), args, lax.Precision.HIGHEST)
    total = jnp.sum(signs_kernel, axis=0)
    y = y - (total - inside.reshape(1, -1, n)).astype(jnp.int32)
  y = y.astype(jnp.float32) * packed.alpha
  return y.reshape(*batch_shape, *out_spatial, n).astype(out_dtype)


# ---------------------------------------------------------------------------
# Files.


class _Unencodable(Exception):
  pass


def _encode_value(v: Any) -> Any:
  """Typed JSON for small metadata values (so tuples come back as tuples)."""
  if v is None or isinstance(v, (bool, str)):
    return {"v": v}
  if isinstance(v, (int, float)):
    return {"int" if isinstance(v, int) else "float": v}
  if isinstance(v, (tuple, list)):
    return {type(v).__name__: [_encode_value(e) for e in v]}
  if isinstance(v, dict) and all(isinstance(key, str) for key in v):
    return {"dict": [[key, _encode_value(e)] for key, e in v.items()]}
  raise _Unencodable(repr(v))


def _decode_value(e: dict[str, Any]) -> Any:
  ((tag, v),) = e.items()
  if tag in ("v", "int", "float"):
    return v
  if tag == "tuple":
    return tuple(_decode_value(x) for x in v)
  if tag == "list":
    return [_decode_value(x) for x in v]
  if tag == "dict":
    return {key: _decode_value(x) for key, x in v}
  raise ValueError(f"unknown metadata tag {tag!r}")


def _type_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _nnx():
  # A tree can only hold nnx objects once flax.nnx is imported; never import it here.
  if "flax.nnx" not in sys.modules:
    return None
  return sys.modules["flax.nnx"]


def _resolve_variable_type(name: str) -> type | None:
  """A Variable class from ``module:qualname``, without importing arbitrary code."""
  module_name, _, qualname = name.partition(":")
  if module_name.split(".")[0] in ("flax", "lab_optax"):
    try:
      importlib.import_module(module_name)
    except ImportError:
      return None
  module = sys.modules.get(module_name)
  if module is None:
    return None
  obj: Any = module
  for part in qualname.split("."):
    obj = getattr(obj, part, None)
  nnx = importlib.import_module("flax.nnx")
  if isinstance(obj, type) and issubclass(obj, nnx.Variable):
    return obj
  return None


def _dict_key(key: Any) -> Any:
  if isinstance(key, (str, int)) and not isinstance(key, bool):
    return key
  raise _Unencodable(repr(key))


def _leaf_array(x: Any, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.dtype.kind not in "biufcV" or (arr.dtype.kind == "V" and arr.dtype.names):
    raise ValueError(f"cannot save the leaf at {name}: dtype {arr.dtype} is not numeric")
  return arr


def _stored(arr: np.ndarray) -> np.ndarray:
  """The array as written: dtypes that .npy cannot name (bfloat16, ...) as raw uints."""
  if np.dtype(arr.dtype.str) == arr.dtype:
    return arr
  return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


class _Encoder:
  """Walks a pytree in flatten order, recording its leaves and a skeleton."""

  def __init__(self, paths: list[str]):
    self.paths = paths  # key paths of the leaves, in flatten order
    self.leaves: list[np.ndarray] = []

  def leaf(self, x: Any) -> int:
    index = len(self.leaves)
    self.leaves.append(_leaf_array(x, self.paths[index] or "<root>"))
    return index

  def encode(self, node: Any) -> dict[str, Any]:
    if node is None:
      return {"kind": "none"}
    if jax.tree_util.all_leaves([node]):
      return {"kind": "leaf", "index": self.leaf(node)}
    # Children in flatten order, so leaf i is the i-th of tree_flatten_with_path.
    children, aux = jax.tree_util.flatten_one_level(node)
    if _is_packed(node):
      bits, alpha = (self.leaf(c) for c in children)
      return {
        "kind": "packed",
        "shape": list(node.shape),
        "dtype": node.dtype,
        "bits": bits,
        "alpha": alpha,
      }
    encoded = [self.encode(c) for c in children]
    nnx = _nnx()
    try:
      if type(node) in (list, tuple):
        return {"kind": type(node).__name__, "children": encoded}
      if type(node) is dict or (nnx is not None and type(node) is nnx.State):
        keys = [_dict_key(key) for key in aux]  # the sorted keys
        kind = "dict" if type(node) is dict else "state"
        return {"kind": kind, "keys": keys, "children": encoded}
      if nnx is not None and isinstance(node, nnx.Variable):
        metadata = _encode_value(dict(node.get_metadata()))
        return {
          "kind": "variable",
          "type": _type_name(type(node)),
          "metadata": metadata,
          "value": encoded[0],
        }
    except _Unencodable:
      pass
    return {"kind": "other", "type": _type_name(type(node)), "children": encoded}


class _Decoder:
  def __init__(self, leaves: list[jax.Array], path: str):
    self.leaves = leaves
    self.file = path

  def need_like(self, what: str, where: str) -> ValueError:
    return ValueError(
      f"{self.file}: holds {what} at {where or '<root>'}, which load_packed cannot rebuild on "
      "its own; pass like=template (a pytree of the same structure) to restore it"
    )

  def decode(self, e: dict[str, Any], path: str = "") -> Any:
    kind = e["kind"]
    if kind == "none":
      return None
    if kind == "leaf":
      return self.leaves[e["index"]]
    if kind == "packed":
      return PackedBinary(
        bits=self.leaves[e["bits"]],
        alpha=self.leaves[e["alpha"]],
        shape=tuple(e["shape"]),
        dtype=e["dtype"],
      )
    if kind in ("list", "tuple"):
      items = [self.decode(c, f"{path}[{i}]") for i, c in enumerate(e["children"])]
      return items if kind == "list" else tuple(items)
    if kind in ("dict", "state"):
      mapping = {
        key: self.decode(c, f"{path}[{key!r}]") for key, c in zip(e["keys"], e["children"])
      }
      if kind == "dict":
        return mapping
      return importlib.import_module("flax.nnx").State(mapping)
    if kind == "variable":
      cls = _resolve_variable_type(e["type"])
      if cls is None:
        raise self.need_like(f"a Variable of type {e['type']} that is not imported", path)
      return cls.from_metadata(
        self.decode(e["value"], f"{path}.value"), _decode_value(e["metadata"])
      )
    raise self.need_like(f"a node of type {e.get('type', kind)}", path)


def _checksum(header: dict[str, Any], arrays: list[np.ndarray]) -> str:
  h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def save_packed(path: str | os.PathLike, packed: Any) -> None:
  """Writes a packed pytree to one ``.npz`` file, atomically, with a checksum.

  The file holds every leaf (``PackedBinary`` bits and alphas, and the
  full-precision leaves) as ``leaf_<i>`` arrays in flatten order, and a JSON
  ``__meta__`` entry with the key path of each leaf, the tree's structure, each
  :class:`PackedBinary`'s shape and dtype, and a sha256 over all of it. Dtypes
  that ``.npy`` cannot name (bfloat16, float8) are stored as raw unsigned
  integers and restored from the recorded name. The file is written to a
  temporary name in the same directory and renamed over ``path``, so a crash
  never leaves a half-written file under ``path``.

  The structure is stored as a skeleton that :func:`load_packed` rebuilds
  without the original code for: ``dict`` and ``nnx.State`` with ``str`` or
  ``int`` keys, ``list``, ``tuple``, ``None`` and ``nnx.Variable`` subclasses
  (``nnx.Param``, ...) whose metadata are plain values (numbers, strings,
  tuples, lists, dicts). Other nodes (namedtuples, dataclasses, optax states,
  custom pytrees) are saved too, but loading them needs ``like=``.

  Args:
    path: the file to write; used as given (no ``.npz`` suffix is appended).
    packed: a pytree of arrays and :class:`PackedBinary` (e.g. from
      :func:`pack`); plain params work too.

  Raises:
    ValueError: if a leaf is not a numeric array (its path is named).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> import lab_optax
    >>> packed = lab_optax.pack({"w": jnp.array([[0.5, -0.5], [0.5, 0.5]]), "b": jnp.zeros(2)})
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> lab_optax.save_packed(path, packed)
    >>> restored = lab_optax.load_packed(path)
    >>> restored["w"].shape, bool((restored["w"].bits == packed["w"].bits).all())
    ((2, 2), True)
  """
  path = os.fspath(path)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(packed)[0]]
  encoder = _Encoder(paths)
  structure = encoder.encode(packed)
  packed_meta = [
    {"path": jax.tree_util.keystr(p), "shape": list(x.shape), "dtype": x.dtype}
    for p, x in jax.tree_util.tree_leaves_with_path(packed, is_leaf=_is_packed)
    if _is_packed(x)
  ]
  stored = [_stored(a) for a in encoder.leaves]
  header = {
    "format": _FORMAT,
    "version": _VERSION,
    "structure": structure,
    "paths": paths,
    "leaves": [{"shape": list(a.shape), "dtype": a.dtype.name} for a in encoder.leaves],
    "packed": packed_meta,
  }
  meta = dict(header, sha256=_checksum(header, stored))
  entries = {f"leaf_{i}": a for i, a in enumerate(stored)}
  entries[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  tmp = os.path.join(
    os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
  )
  try:
    with open(tmp, "xb") as f:
      np.savez(f, **entries)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class _BadFile(ValueError):
  pass


def _read(path: str) -> tuple[dict[str, Any], list[np.ndarray]]:
  try:
    with np.load(path, allow_pickle=False) as npz:
      if _META_KEY not in npz.files:
        raise _BadFile(f"{path}: not a lab_optax packed file (no {_META_KEY} entry)")
      meta = json.loads(npz[_META_KEY].tobytes().decode())
      found = meta.get("format") if isinstance(meta, dict) else None
      if found != _FORMAT:
        raise _BadFile(f"{path}: not a lab_optax packed file (format {found!r})")
      if meta.get("version") != _VERSION:
        raise _BadFile(
          f"{path}: format version {meta.get('version')!r} is not supported (expected {_VERSION})"
        )
      count = len(meta["leaves"])
      missing = [f"leaf_{i}" for i in range(count) if f"leaf_{i}" not in npz.files]
      if missing:
        raise _BadFile(f"{path}: the file is incomplete: entry {missing[0]} is missing")
      arrays = [npz[f"leaf_{i}"] for i in range(count)]
  except (_BadFile, FileNotFoundError, IsADirectoryError, PermissionError):
    raise
  except Exception as e:  # zipfile, zlib and json errors of a damaged file
    raise ValueError(
      f"{path}: cannot read the file, it is truncated or corrupted ({type(e).__name__}: {e})"
    ) from e
  return meta, arrays


def _restore(path: str, meta: dict[str, Any], arrays: list[np.ndarray]) -> list[jax.Array]:
  header = {key: v for key, v in meta.items() if key != "sha256"}
  digest = _checksum(header, arrays)
  if digest != meta.get("sha256"):
    raise ValueError(
      f"{path}: checksum mismatch (sha256 {digest[:16]}... but the file records "
      f"{str(meta.get('sha256'))[:16]}...): the file is corrupted"
    )
  leaves = []
  for i, (a, spec) in enumerate(zip(arrays, meta["leaves"])):
    dtype = jnp.dtype(spec["dtype"])
    a = a.view(dtype) if a.dtype != dtype else a
    if list(a.shape) != spec["shape"]:
      raise ValueError(f"{path}: leaf {meta['paths'][i]} has shape {a.shape}, not {spec['shape']}")
    leaves.append(jnp.asarray(a))
  return leaves


def _leaf_spec(x: Any) -> tuple[list[int], str]:
  dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
  return list(np.shape(x)), jnp.dtype(dtype).name


def _check_like(path: str, meta: dict[str, Any], like: Any) -> Any:
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  t_paths = [jax.tree_util.keystr(p) for p, _ in flat]
  f_paths = meta["paths"]
  for i, (f, t) in enumerate(zip(f_paths, t_paths)):
    if f != t:
      raise ValueError(
        f"{path}: does not match the template: leaf {i} is at {f or '<root>'} in the file "
        f"but at {t or '<root>'} in the template"
      )
  if len(f_paths) != len(t_paths):
    longer, which = (f_paths, "file") if len(f_paths) > len(t_paths) else (t_paths, "template")
    raise ValueError(
      f"{path}: does not match the template: only the {which} has a leaf at "
      f"{longer[min(len(f_paths), len(t_paths))] or '<root>'}"
    )
  for p, spec, (_, x) in zip(f_paths, meta["leaves"], flat):
    shape, dtype = _leaf_spec(x)
    if [spec["shape"], spec["dtype"]] != [shape, dtype]:
      raise ValueError(
        f"{path}: does not match the template at {p or '<root>'}: the file has "
        f"{spec['dtype']}{tuple(spec['shape'])}, the template {dtype}{tuple(shape)}"
      )
  t_packed = {
    jax.tree_util.keystr(p): (list(x.shape), x.dtype)
    for p, x in jax.tree_util.tree_leaves_with_path(like, is_leaf=_is_packed)
    if _is_packed(x)
  }
  f_packed = {e["path"]: (e["shape"], e["dtype"]) for e in meta["packed"]}
  for p in sorted(set(t_packed) | set(f_packed)):
    if t_packed.get(p) != f_packed.get(p):
      describe = lambda s: "no PackedBinary" if s is None else f"a PackedBinary {s[1]}{tuple(s[0])}"
      raise ValueError(
        f"{path}: does not match the template at {p or '<root>'}: the file has "
        f"{describe(f_packed.get(p))}, the template {describe(t_packed.get(p))}"
      )
  return treedef


def load_packed(path: str | os.PathLike, like: Any = None) -> Any:
  """Reads a file written by :func:`save_packed`, refusing damaged or mismatched files.

  The checksum is verified before anything is returned. Leaves come back as
  ``jax.Array`` (so under JAX's default 32-bit mode a saved float64 leaf
  becomes float32, as with :func:`jax.numpy.asarray`).

  Args:
    path: the file.
    like: optional template, a pytree with the structure that the file must
      hold, e.g. ``pack(params)`` of a freshly built model, or its
      :func:`jax.eval_shape`; leaves may be arrays or
      :class:`jax.ShapeDtypeStruct`. The file's key paths, leaf shapes and
      dtypes and packed shapes must match it, and the result takes the
      template's containers. Needed for nodes that the file cannot describe on
      its own (see :func:`save_packed`).

  Returns:
    The packed pytree, to use with :func:`unpack` or the inference helpers.

  Raises:
    ValueError: naming the file, if it is truncated or corrupted (unreadable
      archive, checksum mismatch, missing entries), is not a lab_optax packed
      file, holds nodes that need ``like``, or does not match ``like`` (naming
      the first mismatching path).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> import lab_optax
    >>> packed = lab_optax.pack({"w": jnp.array([[0.5, -0.5], [0.5, 0.5]])})
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> lab_optax.save_packed(path, packed)
    >>> lab_optax.load_packed(path, like=lab_optax.pack({"w": jnp.ones((2, 3))}))
    Traceback (most recent call last):
    ...
    ValueError: ...model.npz: does not match the template at ['w'].bits: the file has uint32(2, 1), the template uint32(3, 1)
  """
  path = os.fspath(path)
  meta, arrays = _read(path)
  try:
    leaves = _restore(path, meta, arrays)
    if like is not None:
      treedef = _check_like(path, meta, like)
      return jax.tree.unflatten(treedef, leaves)
    return _Decoder(leaves, path).decode(meta["structure"])
  except (KeyError, TypeError, IndexError) as e:
    raise ValueError(f"{path}: the metadata is malformed ({type(e).__name__}: {e})") from e

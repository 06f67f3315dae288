"""Packed leaves: the codes of a quantized tensor in bit planes, plus its scales.

* :class:`PackedBinary`: a binarized leaf ``alpha * sign(w)``, one bit per
  weight.
* :class:`PackedQuantized`: a ternary or m-bit leaf, ``scale * level`` with the
  levels of a :class:`~lab_optax.projections.Projection` symmetric about 0, in
  sign-magnitude bit planes: one sign plane and ``ceil(log2(M))`` planes of the
  index of the magnitude among the ``M`` magnitudes of the level set (2 bits
  per ternary weight, ``m`` bits per m-bit weight).

:func:`pack` recognizes the level set of each leaf from its values (or takes it
from a projection), and :func:`unpack` gives the leaf back bit for bit.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lab_optax._src import masks as masks_lib
from lab_optax._src import projections, ste
from lab_optax._src.packing.bits import _pack_bool, _unpack_bool


class _Packed:
  """What both packed leaves share: the leaf seen as a ``(K, N)`` matrix."""

  shape: tuple[int, ...]

  @property
  def k(self) -> int:
    """The reduction length: product of all axes but the last."""
    return math.prod(self.shape[:-1])

  @property
  def n(self) -> int:
    """The number of output channels: the last axis."""
    return self.shape[-1]


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=("bits", "alpha"), meta_fields=("shape", "dtype")
)
@dataclasses.dataclass(frozen=True)
class PackedBinary(_Packed):
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
  def bits_per_weight(self) -> int:
    """Bits per weight as stored: 1."""
    return 1


def _signs(packed: PackedBinary) -> jax.Array:
  """The {-1, +1} float32 matrix of shape ``(K, N)`` held by ``packed``."""
  bits = _unpack_bool(packed.bits, packed.k)
  return jnp.where(bits, jnp.float32(1), jnp.float32(-1)).T


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("planes", "scale"),
  meta_fields=("shape", "dtype", "levels", "divisor", "num_scales"),
)
@dataclasses.dataclass(frozen=True)
class PackedQuantized(_Packed):
  """One ternary or m-bit weight tensor in bit planes, plus its scales.

  The leaf ``w`` of shape ``(*in_axes, N)`` is viewed as the matrix
  ``w.reshape(K, N)``, as for :class:`PackedBinary`, and each weight
  ``scale * sign * magnitudes[index]`` is stored in sign-magnitude form along
  ``K``: ``planes[0]`` holds the signs (a set bit for a weight whose sign bit
  is clear, so ``-0.0`` comes back too) and ``planes[1:]`` the bits of
  ``index`` (least significant first), each packed like
  :func:`lab_optax.pack_bits`, 32 weights to a ``uint32`` word. Ternary
  weights take 2 planes (sign and nonzero), m-bit weights ``m`` planes.

  Sign-magnitude planes rather than denser codes (five ternary weights per
  byte would reach ``log2(3) = 1.6`` bits): the planes are what the XNOR
  inference multiplies directly, with one AND and one popcount per plane and
  word (:func:`lab_optax.xnor_dense`), and a ternary file is still 16x smaller
  than float32.

  A pytree: ``planes`` and ``scale`` are children, the rest static metadata.
  """

  planes: jax.Array  # uint32, (bits, N, ceil(K / 32)): sign, then the magnitude index, LSB first.
  scale: jax.Array  # float32: () or (N,); with two scales (2,) or (2, N), positive first.
  shape: tuple[int, ...]  # shape of the original leaf.
  dtype: str  # dtype name of the original leaf.
  levels: tuple[float, ...]  # the normalized level set, sorted, symmetric about 0.
  divisor: int  # weights are integer multiples of scale / divisor (Projection.divisor).
  num_scales: int  # 1, or 2 for separate positive and negative scales.

  @property
  def bits_per_weight(self) -> int:
    """Bits per weight as stored: the number of planes (2 ternary, m for m-bit)."""
    return 1 + _index_bits(self.levels)

  @property
  def magnitudes(self) -> tuple[float, ...]:
    """The distinct magnitudes of the level set, ascending: ``index`` picks one."""
    return _magnitudes(self.levels)


Packed = PackedBinary | PackedQuantized


def is_packed(x: Any) -> bool:
  return isinstance(x, (PackedBinary, PackedQuantized))


def _magnitudes(levels: tuple[float, ...]) -> tuple[float, ...]:
  return tuple(sorted({abs(float(level)) for level in levels}))


def _index_bits(levels: tuple[float, ...]) -> int:
  return max(0, math.ceil(math.log2(len(_magnitudes(levels)))))


def _check_symmetric(projection: projections.Projection, name: str) -> None:
  levels = tuple(float(level) for level in projection.levels)
  if not levels or sorted(levels) != sorted(-level for level in levels):
    raise ValueError(
      f"cannot pack the leaf at {name} on the levels {levels} of {projection!r}: pack stores "
      "sign and magnitude, and needs a level set symmetric about 0"
    )


#: The level sets of the built-in projections with more than two levels, fewest
#: levels (then scales) first: a ternary kernel is on every m-bit level set too.
LOW_BIT_SETS: tuple[projections.Projection, ...] = (
  projections.TernaryProjection(),
  projections.TernaryProjection(scales=2),
  *(projections.MbitProjection(bits, kind) for bits in range(3, 9) for kind in ("linear", "log")),
)


def _channel_axes(ndim: int) -> tuple[int, ...]:
  return tuple(range(ndim - 1))


def _distinct_magnitudes(x: np.ndarray) -> int:
  """The most distinct nonzero magnitudes in one output channel (last axis)."""
  mat = np.sort(np.abs(x.astype(np.float32)).reshape(-1, x.shape[-1]), axis=0)
  return int(np.max((np.diff(mat, axis=0) != 0).sum(axis=0) + (mat[0] != 0)))


def _near_levels(x: np.ndarray, projection: projections.Projection, per_channel: bool) -> bool:
  """A cheap necessary condition in NumPy: every magnitude over its group's largest is near a level.

  With the top level used (as :func:`find_level_set` reads leaves), ``|x| / max|x|``
  is a normalized level up to rounding; checked to ``1e-5``, before the exact
  (compiled) check.
  """
  mags = np.sort(np.abs(np.asarray(projection.levels, np.float64)))
  mags = np.unique(mags / mags[-1])
  mat = x.astype(np.float64).reshape(-1, x.shape[-1])
  sides = [np.abs(mat)] if projection.num_scales == 1 else [np.maximum(mat, 0), np.maximum(-mat, 0)]
  for side in sides:
    top = side.max(axis=0 if per_channel else None, keepdims=True)
    ratio = side / np.where(top > 0, top, 1)
    i = np.clip(np.searchsorted(mags, ratio), 1, len(mags) - 1)
    nearest = np.minimum(np.abs(ratio - mags[i - 1]), np.abs(ratio - mags[i]))
    if nearest.max() > 1e-5:
      return False
  return True


def find_level_set(
  x: Any,
  projection: projections.Projection | None = None,
  per_channel: bool | None = None,
) -> tuple[projections.Projection, bool] | None:
  """The ternary or m-bit level set a concrete leaf is on, exactly, and whether per channel.

  Tries ``projection`` if given, else the built-in level sets of
  :data:`LOW_BIT_SETS` (fewest levels first), one scale per tensor before one
  per output channel (a channel needs more than one weight), as
  :func:`lab_optax.summary` reads kernels. ``None`` if no level set holds
  ``x`` exactly (binary leaves are not looked for: see :func:`pack`).
  """
  x = jnp.asarray(x)
  if x.ndim == 0 or x.size == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
    return None
  arr = np.asarray(x)
  if not np.isfinite(arr.astype(np.float32)).all():
    return None
  layouts = [False, True] if per_channel is None else [per_channel]
  if x.size <= x.shape[-1]:  # one weight per channel: only one scale per tensor counts
    layouts = [p for p in layouts if not p]
  candidates = LOW_BIT_SETS if projection is None else (projection,)
  # A cheap necessary condition: no more distinct magnitudes per group than the set has.
  distinct = {
    layout: _distinct_magnitudes(arr if layout else arr.reshape(-1, 1)) for layout in layouts
  }
  for candidate in candidates:
    positive = sum(level > 0 for level in candidate.levels)
    for layout in layouts:
      if projection is None and (
        distinct[layout] > positive * candidate.num_scales
        or not _near_levels(arr, candidate, layout)
      ):
        continue
      axis = _channel_axes(x.ndim) if layout else None
      if bool(fit_levels(x, candidate, axis, search=projection is not None)[2]):
        return candidate, layout
  return None


# Jitted, projection, axes and search static: called eagerly by pack and summary.
@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames="search")
def fit_levels(
  x: jax.Array, projection: projections.Projection, axis: projections.Axis = None, *, search=True
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Codes and scales that give ``x`` back exactly on ``projection``'s levels, if any.

  For each group (the tensor, or each output channel with ``axis``; each sign
  with two scales) the scale puts the largest magnitude on the top level, as
  :func:`lab_optax._src.ste.level_codes` reads kernels; with ``search``, the
  scales ``max|x| / level`` for the lower positive levels are tried next, in
  turn, for a group whose largest weight is below the top level (LAQ's
  least-squares scale may leave the top codes unused, most often with many
  levels). A scale fits when ``projection.dequantize(codes, scale)`` equals
  ``x`` (cast to its dtype). The codes are the nearest levels
  (:meth:`Projection.codes` of the base class).

  :func:`pack` searches when it is given the projection; when it recognizes
  a leaf's level set among many, it does not, since with a free top level
  more float kernels would fit a fine level set by chance (a binary kernel
  with one weight scaled by 0.3 is on 7-bit linear levels).

  Returns:
    ``(codes, scale, exact)``: codes in at least float32, the scales reduced
    over ``axis`` with keepdims (stacked for two scales), and whether every
    group came back exactly.
  """
  w = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  top = ste._top_scale(w, projection, axis)
  positive = sorted({abs(float(level)) for level in projection.levels if level}, reverse=True)
  ratios = [positive[0] / level for level in positive] if search else []
  ratios = jnp.asarray(ratios or [1.0], jnp.float32)

  def exact_at(scale):
    codes = projections.Projection.codes(projection, w, scale, axis)
    ok = projection.dequantize(codes, scale).astype(x.dtype) == x
    if projection.num_scales == 1:
      return codes, jnp.all(ok, axis=axis, keepdims=True)
    sides = [ok | ~(w > 0), ok | ~(w < 0)]  # each scale answers for its sign alone
    return codes, jnp.stack([jnp.all(side, axis=axis, keepdims=True) for side in sides])

  def cond(carry):
    i, _, found = carry
    return (i < len(ratios)) & ~jnp.all(found)

  def body(carry):
    i, scale, found = carry
    trial = jnp.where(found, scale, top * ratios[i])
    return i + 1, trial, found | exact_at(trial)[1]

  start = (jnp.int32(0), top, jnp.zeros(top.shape, jnp.bool_))
  _, scale, found = jax.lax.while_loop(cond, body, start)
  scale = jnp.where(found, scale, top)
  return exact_at(scale)[0], scale, jnp.all(found)


def _pack_binary(x: jax.Array, name: str, per_channel: bool | None) -> PackedBinary:
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


class _NotBinary(ValueError):
  pass


def _layout_error(name: str, mags: np.ndarray) -> ValueError:
  count = len(np.unique(mags))
  return _NotBinary(
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


class LevelSet(projections.Projection):
  """The level set of a packed leaf: nearest levels at the scale of the largest magnitude.

  What :func:`level_set` gives for a :class:`PackedQuantized` whose level set
  is not a built-in projection's: enough for a layer to know its kernel's
  levels (it uses the packed kernel as it is).
  """

  def __init__(self, levels: tuple[float, ...], num_scales: int = 1, divisor: int = 1):
    self.levels = tuple(float(level) for level in levels)
    self.num_scales = num_scales
    self.divisor = divisor

  def __call__(self, w, d, axis=None, codes=None):
    del d, codes
    scale = ste._top_scale(w, self, axis)
    return self.codes(w, scale, axis), scale

  def _key(self):
    return (self.levels, self.num_scales, self.divisor)

  def __eq__(self, other):
    return type(other) is type(self) and other._key() == self._key()

  def __hash__(self):
    return hash((type(self), self._key()))

  def __repr__(self):
    return f"LevelSet(levels={self.levels}, num_scales={self.num_scales})"


def level_set(packed: Packed) -> projections.Projection:
  """A projection with the packed leaf's level set: BWN's for binary, else a built-in's or a :class:`LevelSet`."""
  if isinstance(packed, PackedBinary):
    return projections.bwn
  key = (packed.levels, packed.num_scales, packed.divisor)
  for projection in LOW_BIT_SETS:
    if (tuple(map(float, projection.levels)), projection.num_scales, projection.divisor) == key:
      return projection
  return LevelSet(packed.levels, packed.num_scales, packed.divisor)


# Jitted, projection and layout static: one compilation per leaf shape and level set.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_quantized_leaf(x: jax.Array, projection, per_channel: bool):
  axis = _channel_axes(x.ndim) if per_channel else None
  codes, scale, _ = fit_levels(x, projection, axis)
  mat = x.reshape(-1, x.shape[-1]).T  # (N, K)
  magnitude = jnp.abs(codes).reshape(mat.T.shape).T
  index = jnp.zeros(mat.shape, jnp.uint32)
  for i, m in enumerate(_magnitudes(projection.levels)):
    index = jnp.where(magnitude == jnp.asarray(m, magnitude.dtype), jnp.uint32(i), index)
  planes = [_pack_bool(~jnp.signbit(mat))]
  planes += [_pack_bool((index >> j) & 1 == 1) for j in range(_index_bits(projection.levels))]
  lead = (2,) if projection.num_scales == 2 else ()
  scale = scale.reshape(*lead, -1) if per_channel else scale.reshape(lead)
  return jnp.stack(planes), scale.astype(jnp.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  return a.shape == b.shape and a.tobytes() == b.tobytes()


def _pack_quantized(
  x: jax.Array, name: str, projection: projections.Projection, per_channel: bool
) -> PackedQuantized:
  _check_symmetric(projection, name)
  planes, scale = _pack_quantized_leaf(x, projection, per_channel)
  packed = PackedQuantized(
    planes=planes,
    scale=scale,
    shape=tuple(x.shape),
    dtype=jnp.dtype(x.dtype).name,
    levels=tuple(float(level) for level in projection.levels),
    divisor=int(projection.divisor),
    num_scales=int(projection.num_scales),
  )
  if not isinstance(x, jax.core.Tracer) and not _same_bits(
    np.asarray(_unpack_leaf(packed)), np.asarray(x)
  ):
    raise ValueError(
      f"the leaf at {name} is on the levels of {projection!r} but does not come back exactly "
      "from scale * level (a projection whose dequantize differs): it cannot be packed"
    )
  return packed


def _not_quantized(name: str, x: jax.Array) -> ValueError:
  count = len(np.unique(np.abs(np.asarray(x, np.float32))))
  return ValueError(
    f"the leaf at {name} is not quantized: it holds {count} distinct magnitudes, on no binary, "
    "ternary or m-bit level set with one scale per tensor or per output channel (last axis); "
    "pass the params that lab_optax's optimizers write (or lab_optax.quantize_params), give its "
    "projection=, or leave this leaf out of the mask"
  )


def _pack_leaf(
  x: Any, name: str, per_channel: bool | None, projection: projections.Projection | None
) -> Packed:
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"cannot pack the scalar leaf at {name}: quantized leaves need an axis")
  if projection is None or isinstance(projection, projections.BinaryProjection):
    try:
      return _pack_binary(x, name, per_channel)
    except _NotBinary:
      if projection is not None:
        raise
      found = find_level_set(x, None, per_channel)
      if found is None:
        raise _not_quantized(name, x) from None
      return _pack_quantized(x, name, *found)
  if isinstance(x, jax.core.Tracer):
    if per_channel is None:
      raise ValueError(
        f"pack detects per-tensor or per-channel scales from the values of {name}, which are "
        "traced here; under jax.jit pass per_channel=True or per_channel=False"
      )
    return _pack_quantized(x, name, projection, per_channel)
  found = find_level_set(x, projection, per_channel)
  if found is None:
    raise ValueError(
      f"the leaf at {name} is not on the level set of {projection!r} with one scale "
      + (
        "per output channel"
        if per_channel
        else "per tensor"
        if per_channel is False
        else "per tensor or per output channel"
      )
    )
  return _pack_quantized(x, name, *found)


def pack(
  params: Any,
  mask: masks_lib.MaskOrFn = None,
  *,
  per_channel: bool | None = None,
  projection: projections.Projection | None = None,
) -> Any:
  """Replaces every quantized leaf of ``params`` by its packed form.

  A binarized leaf, ``alpha * sign(w)`` (one magnitude per tensor, or one per
  output channel: the last axis), becomes a :class:`PackedBinary` (1 bit per
  weight). A ternary or m-bit leaf becomes a :class:`PackedQuantized` (2 bits
  per ternary weight, ``m`` per m-bit weight): its level set is recognized
  among those of lab_optax's projections (ternary with one or two scales,
  linear and logarithmic m-bit levels from 3 to 8 bits; the fewest levels
  that hold the leaf exactly), or taken from ``projection``. Whether the
  scales are per tensor or per output channel is read from the values unless
  ``per_channel`` says it. Unselected leaves are returned as they are.
  :func:`unpack` inverts this exactly.

  Args:
    params: a pytree of arrays holding quantized weights (the params that
      lab_optax's transformations write; dicts, lists, tuples, ``nnx.State``).
    mask: ``None`` selects every floating leaf with ``ndim >= 2`` (as
      :func:`lab_optax.default_mask`); otherwise a pytree of bools with the
      structure of ``params``, or a callable ``params -> such a pytree``. Use
      the mask given to the optimizer.
    per_channel: ``None`` detects the scale layout of each leaf from its
      values, which needs concrete arrays. Under :func:`jax.jit` pass ``True``
      (one scale per output channel) or ``False`` (one per tensor); traced
      values cannot be checked, so a leaf that is not quantized then packs to
      the nearest levels of its largest magnitude.
    projection: the :class:`~lab_optax.projections.Projection` whose level set
      every selected leaf is on (the optimizer's: ``tx.projection`` or the
      layers' ``kernel_quantizer``); ``None`` recognizes each leaf's. Needed
      under :func:`jax.jit` for ternary and m-bit leaves (without it a traced
      leaf is packed as binary). Its levels must be symmetric about 0.

  Returns:
    A pytree with the structure of ``params`` in which every selected leaf is a
    :class:`PackedBinary` or :class:`PackedQuantized`.

  Raises:
    ValueError: if a selected leaf is not quantized (its path is named), is a
      scalar, or does not match the given ``per_channel`` or ``projection``;
      or if the mask is invalid (see :func:`lab_optax.default_mask`).

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

    A ternary leaf takes two bit planes, signs and nonzeros:

    >>> ternary = lab_optax.pack({"w": jnp.array([[0.5, 0.0], [-0.5, 0.5]])})["w"]
    >>> type(ternary).__name__, ternary.bits_per_weight, ternary.planes[:, :, 0], ternary.scale
    ('PackedQuantized', 2, Array([[1, 3],
           [3, 2]], dtype=uint32), Array(0.5, dtype=float32))
  """
  flags = masks_lib.resolve_mask(mask, params)

  def one(path, p, selected):
    if not selected:
      return p
    return _pack_leaf(p, jax.tree_util.keystr(path) or "<root>", per_channel, projection)

  return jax.tree_util.tree_map_with_path(one, params, flags)


def _unpack_binary(packed: PackedBinary) -> jax.Array:
  return _signs(packed) * packed.alpha


def _bit_terms(magnitudes: tuple[float, ...]) -> list[np.float32] | None:
  """``[first, step, 2 step, 4 step, ...]`` in float32 if their sums over each index's bits
  give every magnitude exactly (linear levels), else ``None``."""
  if len(magnitudes) < 2:
    return None
  first, step = magnitudes[0], magnitudes[1] - magnitudes[0]
  bits = _index_bits(magnitudes)
  terms = [np.float32(first)] + [np.float32(step * 2**j) for j in range(bits)]
  for i, m in enumerate(magnitudes):
    total = terms[0]
    for j in range(bits):
      total = total + (terms[j + 1] if (i >> j) & 1 else np.float32(0))
    if total != np.float32(m):
      return None
  return terms


def _unit_kernel(packed: PackedQuantized) -> tuple[jax.Array, jax.Array]:
  """``(sign, sign * magnitudes[index])``: the normalized kernel in float32, ``(N, K)``.

  In the planes' own layout (output channels first): a transpose of the
  unpacked bits costs more than the product that uses them.
  """
  sign, *index_bits = [_unpack_bool(plane, packed.k) for plane in packed.planes]
  magnitudes = packed.magnitudes
  terms = _bit_terms(magnitudes)
  if terms is not None:
    # Linear levels (ternary included): the index's bits weighted by powers of two.
    magnitude = jnp.full(sign.shape, terms[0], jnp.float32)
    for term, b in zip(terms[1:], index_bits):
      magnitude = magnitude + jnp.where(b, term, jnp.float32(0))
  else:
    index = jnp.zeros(sign.shape, jnp.int32)
    for j, b in enumerate(index_bits):
      index = index | (b.astype(jnp.int32) << j)
    magnitude = jnp.asarray(magnitudes, jnp.float32)[index]
  return sign, jnp.where(sign, magnitude, -magnitude)


def _index(packed: PackedQuantized) -> jax.Array:
  """The magnitude index of every weight, ``(N, K)`` int32."""
  index = jnp.zeros((packed.n, packed.k), jnp.int32)
  for j, plane in enumerate(packed.planes[1:]):
    index = index | (_unpack_bool(plane, packed.k).astype(jnp.int32) << j)
  return index


def _by_sign(packed: PackedQuantized, sign: jax.Array) -> jax.Array:
  return (
    jnp.where(sign, packed.scale[0], packed.scale[1]) if packed.num_scales == 2 else packed.scale
  )


def _unpack_quantized(packed: PackedQuantized) -> jax.Array:
  # As Projection.dequantize and MbitProjection.dequantize compute it, in (K, N).
  sign, unit = (a.T for a in _unit_kernel(packed))
  scale = _by_sign(packed, sign)
  if packed.divisor > 1:
    return jnp.round(unit * packed.divisor) * (scale / packed.divisor)
  return unit * scale


@jax.jit
def _unpack_leaf(packed: Packed) -> jax.Array:
  binary = isinstance(packed, PackedBinary)
  w = _unpack_binary(packed) if binary else _unpack_quantized(packed)
  return w.astype(jnp.dtype(packed.dtype)).reshape(packed.shape)


def unpack(packed: Any) -> Any:
  """Turns every packed leaf of a pytree back into its array.

  The result equals the params given to :func:`pack` bit for bit, with the same
  shapes and dtypes (:func:`pack` checks it for ternary and m-bit leaves).
  Works under :func:`jax.jit`.

  Args:
    packed: a pytree returned by :func:`pack` or :func:`load_packed`.

  Returns:
    The pytree with each packed leaf replaced by a ``jax.Array`` of
    its original shape and dtype; other leaves are returned as they are.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lab_optax
    >>> w = jnp.array([[0.25, -0.25], [-0.25, 0.25]], jnp.bfloat16)
    >>> lab_optax.unpack(lab_optax.pack({"w": w}))["w"]
    Array([[0.25, -0.25],
           [-0.25, 0.25]], dtype=bfloat16)
  """
  return jax.tree.map(lambda x: _unpack_leaf(x) if is_packed(x) else x, packed, is_leaf=is_packed)

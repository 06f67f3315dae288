"""A per-layer summary of a quantized NNX model, as ``larq.models.summary``."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lab_optax._src import packing, projections
from lab_optax._src.packing import PackedBinary, PackedQuantized
from lab_optax._src.ste import quantize_ste
from lab_optax.nnx.layers import BinaryParam


def _merge_bits(*groups: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
  total: dict[int, int] = {}
  for group in groups:
    for bits, count in group:
      total[bits] = total.get(bits, 0) + count
  return tuple(sorted(total.items()))


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """Figures of one layer (a module that owns variables directly)."""

  path: str  # Attribute path in the model, e.g. "layers/0".
  kind: str  # The module's class name.
  binary_params: int  # Weights kept as 1 bit: BinaryParam kernels and binarized kernels.
  float_params: int  # Other parameters and batch statistics, kept as float32.
  alphas: int  # float32 scales of the quantized kernels (binary, ternary and m-bit).
  # Paths of the kernels (floating Params with ndim >= 2) kept in full precision, e.g. "out/kernel".
  full_precision: tuple[str, ...] = ()
  # (bits, count) of the weights on more than two levels, by bits per weight as
  # stored: 2 for ternary (log2(3) = 1.58 is their information), m for m-bit.
  low_bit_params: tuple[tuple[int, int], ...] = ()
  zeros: int = 0  # Exact zeros among the quantized weights (ternary and m-bit codes 0).
  # Paths of quantized kernels that pack_model keeps dense (ternary or m-bit values in a layer whose
  # kernel quantizer is binary: its forward pass binarizes them).
  not_packed: tuple[str, ...] = ()

  @property
  def quantized_params(self) -> int:
    """Weights on a level set: binary, ternary and m-bit."""
    return self.binary_params + sum(count for _, count in self.low_bit_params)

  @property
  def quantized_bits(self) -> int:
    """Bits of the quantized weights as stored: 1 per binary weight, ``m`` per m-bit weight."""
    return self.binary_params + sum(bits * count for bits, count in self.low_bit_params)

  @property
  def bits_per_weight(self) -> float:
    """Mean bits per quantized weight as stored (0 when nothing is quantized)."""
    return self.quantized_bits / self.quantized_params if self.quantized_params else 0.0

  @property
  def zero_fraction(self) -> float:
    """The fraction of exact zeros among the quantized weights (0 when nothing is quantized)."""
    return self.zeros / self.quantized_params if self.quantized_params else 0.0

  @property
  def float32_bytes(self) -> int:
    """Memory with every weight stored as float32."""
    return 4 * (self.quantized_params + self.float_params)

  @property
  def binary_bytes(self) -> float:
    """Memory when deployed: the quantized weights at their bits, float32 for the rest and the alphas."""
    return self.quantized_bits / 8 + 4 * (self.alphas + self.float_params)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """The layers of a model and their totals."""

  layers: tuple[LayerSummary, ...]

  @property
  def binary_params(self) -> int:
    return sum(layer.binary_params for layer in self.layers)

  @property
  def low_bit_params(self) -> tuple[tuple[int, int], ...]:
    """(bits, count) of the ternary and m-bit weights, summed over the layers."""
    return _merge_bits(*(layer.low_bit_params for layer in self.layers))

  @property
  def quantized_params(self) -> int:
    return sum(layer.quantized_params for layer in self.layers)

  @property
  def float_params(self) -> int:
    return sum(layer.float_params for layer in self.layers)

  @property
  def alphas(self) -> int:
    return sum(layer.alphas for layer in self.layers)

  @property
  def zeros(self) -> int:
    return sum(layer.zeros for layer in self.layers)

  @property
  def bits_per_weight(self) -> float:
    """Mean bits per quantized weight as stored (0 when nothing is quantized)."""
    quantized = self.quantized_params
    return sum(layer.quantized_bits for layer in self.layers) / quantized if quantized else 0.0

  @property
  def zero_fraction(self) -> float:
    """The fraction of exact zeros among the quantized weights."""
    return self.zeros / self.quantized_params if self.quantized_params else 0.0

  @property
  def full_precision(self) -> tuple[str, ...]:
    """Paths of the kernels kept in full precision (not quantized), e.g. ``"out/kernel"``."""
    return tuple(path for layer in self.layers for path in layer.full_precision)

  @property
  def not_packed(self) -> tuple[str, ...]:
    """Paths of the quantized kernels that :func:`~lab_optax.nnx.pack_model` keeps dense."""
    return tuple(path for layer in self.layers for path in layer.not_packed)

  @property
  def float32_bytes(self) -> int:
    return sum(layer.float32_bytes for layer in self.layers)

  @property
  def binary_bytes(self) -> float:
    return sum(layer.binary_bytes for layer in self.layers)

  @property
  def compression(self) -> float:
    """float32 memory over deployed memory."""
    return self.float32_bytes / self.binary_bytes if self.binary_bytes else 1.0

  def table(self) -> str:
    """The summary as a text table."""
    low_bits = [bits for bits, _ in self.low_bit_params]

    def counts(s):
      by_bits = dict(s.low_bit_params)
      return [f"{by_bits.get(bits, 0):,}" for bits in low_bits]

    zeros = ["zeros"] if low_bits else []

    def zero_cell(s):
      return [f"{100 * s.zero_fraction:.1f}%"] if low_bits else []

    header = (
      "Layer",
      "Type",
      "1-bit params",
      *(f"{bits}-bit params" for bits in low_bits),
      "32-bit params",
      "alphas",
      *zeros,
      "float32 KiB",
      "binary KiB",
    )

    def row(name, kind, s):
      return (
        name,
        kind,
        f"{s.binary_params:,}",
        *counts(s),
        f"{s.float_params:,}",
        f"{s.alphas:,}",
        *zero_cell(s),
        f"{s.float32_bytes / 1024:.2f}",
        f"{s.binary_bytes / 1024:.2f}",
      )

    rows = [row(layer.path, layer.kind, layer) for layer in self.layers]
    total = row("Total", "", self)
    widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]

    def line(r):
      cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
      cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
      return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    lines = [
      line(header),
      rule,
      *map(line, rows),
      rule,
      line(total),
      f"Compression: {self.compression:.1f}x",
    ]
    if low_bits:
      lines.append(
        f"Bits per quantized weight: {self.bits_per_weight:.2f} (ternary stored as 2 bits)"
      )
    if self.full_precision:
      lines.append(f"Full precision kernels: {', '.join(self.full_precision)}")
    if self.not_packed:
      lines.append(f"Quantized kernels pack_model keeps dense: {', '.join(self.not_packed)}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def _is_kernel(value: Any) -> bool:
  """A floating array with ``ndim >= 2``: a weight matrix or a conv kernel (as default_mask)."""
  dtype = getattr(value, "dtype", None)
  return (
    dtype is not None
    and jnp.issubdtype(dtype, jnp.floating)
    and len(getattr(value, "shape", ())) >= 2
  )


def _binarized_layout(kernel: Any) -> bool | None:
  """How a kernel's values are binarized: ``None`` if they are not, else whether per channel.

  The rule of :func:`lab_optax.pack` and :func:`lab_optax.binarize_ste`: all
  magnitudes equal (``False``: one alpha per tensor), or equal within each
  output channel (last axis) when a channel holds more than one weight
  (``True``: one alpha per channel). NaN never counts as binarized. Needs
  concrete values.
  """
  mat = np.asarray(kernel)
  if mat.ndim == 0:
    return None
  mat = mat.reshape(-1, mat.shape[-1])
  try:
    return packing.leaves._detect_layout(mat, "")
  except ValueError:
    return None


def _level_bits(projection: projections.Projection) -> int:
  """Bits per weight of a level set as stored: 1 binary, 2 ternary, m for m-bit."""
  return max(1, math.ceil(math.log2(len(projection.levels))))


@dataclasses.dataclass(frozen=True)
class _LowBit:
  bits: int
  alphas: int  # scales of the kernel
  zeros: int
  name: str  # "ternary", "3-bit linear", ...


def _describe(projection: projections.Projection) -> str:
  if isinstance(projection, projections.MbitProjection):
    return f"{projection.bits}-bit {projection.kind}"
  if len(projection.levels) == 3 and 0.0 in projection.levels:
    return "ternary"
  return f"{_level_bits(projection)}-bit"


def _on_levels(kernel: Any, projection: projections.Projection | None = None) -> _LowBit | None:
  """The figures of a kernel on ``projection``'s level set, or on a built-in ternary or m-bit one.

  Exactly, as :func:`lab_optax.pack` recognizes it
  (:func:`lab_optax._src.packing.find_level_set`); ``None`` if it is on none.
  Needs concrete values.
  """
  found = packing.find_level_set(kernel, projection)
  if found is None:
    return None
  projection, per_channel = found
  groups = np.shape(kernel)[-1] if per_channel else 1
  return _LowBit(
    _level_bits(projection),
    projection.num_scales * groups,
    int(np.sum(np.asarray(kernel) == 0)),
    _describe(projection),
  )


def _packed_zeros(packed: PackedQuantized) -> int:
  """The weights whose magnitude is 0."""
  if packed.magnitudes[0] != 0:
    return 0
  index = packing.leaves._index(packed)
  return int(np.sum(np.asarray(index) == 0))


def _alphas(kernel: jax.Array | PackedBinary) -> int:
  """One alpha per tensor, or per output channel when the kernel was binarized so."""
  if isinstance(kernel, PackedBinary):
    return int(np.size(kernel.alpha))
  k = np.abs(np.asarray(kernel, np.float32))
  if k.size == 0 or k.ndim == 0 or k.max() == k.min():
    return 1
  per_channel = k.reshape(-1, k.shape[-1])
  if len(per_channel) > 1 and (per_channel.max(axis=0) == per_channel.min(axis=0)).all():
    return k.shape[-1]
  return 1  # not binarized yet: the layer binarizes it with one alpha (BWN)


def _quantizer_output(module: nnx.Module, array: Any) -> tuple[Any, Any]:
  """The layer's kernel quantizer and the kernel as its forward pass uses it.

  ``(None, array)`` for a binary quantizer, which the summary reads as before.
  """
  quantizer = getattr(module, "kernel_quantizer", None)
  if quantizer is None or isinstance(quantizer, projections.BinaryProjection):
    return None, array
  if isinstance(quantizer, projections.Projection):
    return quantizer, quantize_ste(jnp.asarray(array), quantizer)
  return quantizer, quantizer(jnp.asarray(array))


def _kernel_layout(kernel: Any) -> tuple[str, int] | None:
  """What level set a kernel's values are on: ``("binary", 1)``, ``("ternary", 2)``,
  ``("3-bit linear", 3)``, ... (the name and bits per weight as stored), or ``None``."""
  if _binarized_layout(kernel) is not None:
    return "binary", 1
  found = _on_levels(kernel)
  return None if found is None else (found.name, found.bits)


def summary(model: nnx.Module, print_fn: Callable[[str], None] | None = print) -> ModelSummary:
  """Parameter counts by bit-width and memory of a quantized NNX model.

  For each layer: the 1-bit weights, the ternary and m-bit weights by bits
  per weight, the 32-bit parameters and batch statistics, the number of
  scales (alphas), the fraction of zeros among the quantized weights, the
  memory with everything in float32, and the memory in deployed form (the
  quantized weights at their bits plus one float32 per alpha); then the
  totals.

  Bits per weight are counted as stored: 1 for binary weights, 2 for ternary
  ones (a 2-bit code; their information is ``log2(3) = 1.58`` bits) and ``m``
  for m-bit ones.

  The 1-bit weights are the :class:`lab_optax.nnx.BinaryParam` kernels of
  binary layers (which binarize them in their forward pass, so they count
  before training too), packed kernels, and, in any layer (plain
  ``nnx.Linear``, ``nnx.Conv``, ...), every floating ``nnx.Param`` with
  ``ndim >= 2`` whose values are binarized, as :func:`lab_optax.lab` leaves
  them with its default mask: one magnitude per tensor, or one per output
  channel (last axis) when a channel holds more than one weight; one alpha per
  tensor or per channel. Ternary and m-bit weights are recognized alike, by
  their values, on the level sets of the built-in projections (ternary with
  one or two scales, linear and logarithmic m-bit levels of 3 to 8 bits), and
  a quantized layer's kernel (``kernel_quantizer="lat"``, ...) counts as its
  quantizer makes it. The other such kernels are kept in full precision and
  named in :attr:`ModelSummary.full_precision` and on the table's last lines;
  the ternary and m-bit kernels of layers whose kernel quantizer is binary
  (their forward pass binarizes them, and :func:`lab_optax.nnx.pack_model`
  keeps them dense) in :attr:`ModelSummary.not_packed`. Packed kernels
  (:class:`lab_optax.PackedBinary`, :class:`lab_optax.PackedQuantized`) count
  at their bits.

  Args:
    model: an NNX module.
    print_fn: called with the table; ``None`` prints nothing.

  Returns:
    A :class:`ModelSummary` with the figures.

  Example usage::

    >>> from flax import nnx
    >>> import lab_optax
    >>> from lab_optax.nnx import BinaryLinear
    >>> s = lab_optax.summary(BinaryLinear(64, 32, rngs=nnx.Rngs(0)), print_fn=None)
    >>> s.binary_params, s.float_params, s.float32_bytes, s.binary_bytes
    (2048, 32, 8320, 388.0)
    >>> lab_optax.summary(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), print_fn=None).full_precision
    ('kernel',)
    >>> t = lab_optax.summary(
    ...   BinaryLinear(64, 32, kernel_quantizer="lat", rngs=nnx.Rngs(0)), print_fn=None)
    >>> t.low_bit_params, t.bits_per_weight, t.not_packed
    (((2, 2048),), 2.0, ())
    >>> 0 < t.zero_fraction < 1
    True
  """
  layers = []
  for path, module in nnx.iter_modules(model):
    binary = floating = alphas = zeros = 0
    low_bit: list[tuple[int, int]] = []
    full_precision, not_packed = [], []
    for name, value in vars(module).items():
      if not isinstance(value, (nnx.Param, nnx.BatchStat)):
        continue
      array = value.get_value()
      size = int(np.prod(np.shape(array)))  # a PackedBinary keeps the kernel's shape
      where = "/".join(map(str, (*path, name)))
      if isinstance(array, PackedBinary):
        binary += size
        alphas += _alphas(array)
        continue
      if isinstance(array, PackedQuantized):
        low_bit.append((array.bits_per_weight, size))
        alphas += int(np.size(array.scale))
        zeros += _packed_zeros(array)
        continue
      kernel = isinstance(value, nnx.Param) and _is_kernel(array)
      found = None
      if isinstance(value, BinaryParam):
        quantizer, array = _quantizer_output(module, array)
        if quantizer is None:  # binary: the layer binarizes it
          binary += size
          alphas += _alphas(array)
          if kernel and _binarized_layout(array) is None and _on_levels(array) is not None:
            not_packed.append(where)  # on ternary or m-bit levels: pack_model keeps it dense
          continue
        if isinstance(quantizer, projections.Projection):
          found = _on_levels(array, quantizer)
      if found is None and kernel:
        layout = _binarized_layout(array)
        if layout is not None:
          binary += size
          alphas += array.shape[-1] if layout else 1
          continue
        found = _on_levels(array)
      if found is not None and found.bits == 1:
        binary += size
        alphas += found.alphas
      elif found is not None:
        low_bit.append((found.bits, size))
        alphas += found.alphas
        zeros += found.zeros
      else:
        floating += size
        if kernel:
          full_precision.append(where)
    if binary or floating or low_bit:
      layer_name = "/".join(map(str, path)) or "<model>"
      layers.append(
        LayerSummary(
          layer_name,
          type(module).__name__,
          binary,
          floating,
          alphas,
          tuple(full_precision),
          _merge_bits(tuple(low_bit)),
          zeros,
          tuple(not_packed),
        )
      )
  result = ModelSummary(tuple(layers))
  if print_fn is not None:
    print_fn(result.table())
  return result

"""A per-layer summary of a binarized NNX model, as ``larq.models.summary``."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lab_optax._src import packing
from lab_optax._src.packing import PackedBinary
from lab_optax.nnx.layers import BinaryParam


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """Figures of one layer (a module that owns variables directly)."""

  path: str  # Attribute path in the model, e.g. "layers/0".
  kind: str  # The module's class name.
  binary_params: int  # Weights kept as 1 bit: BinaryParam kernels and binarized kernels.
  float_params: int  # Other parameters and batch statistics, kept as float32.
  alphas: int  # float32 scales of the binarized kernels.
  # Paths of the kernels (floating Params with ndim >= 2) kept in full precision, e.g. "out/kernel".
  full_precision: tuple[str, ...] = ()

  @property
  def float32_bytes(self) -> int:
    """Memory with every weight stored as float32."""
    return 4 * (self.binary_params + self.float_params)

  @property
  def binary_bytes(self) -> float:
    """Memory when deployed: 1 bit per binarized weight, float32 for the rest and the alphas."""
    return self.binary_params / 8 + 4 * (self.alphas + self.float_params)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """The layers of a model and their totals."""

  layers: tuple[LayerSummary, ...]

  @property
  def binary_params(self) -> int:
    return sum(layer.binary_params for layer in self.layers)

  @property
  def float_params(self) -> int:
    return sum(layer.float_params for layer in self.layers)

  @property
  def alphas(self) -> int:
    return sum(layer.alphas for layer in self.layers)

  @property
  def full_precision(self) -> tuple[str, ...]:
    """Paths of the kernels kept in full precision (not binarized), e.g. ``"out/kernel"``."""
    return tuple(path for layer in self.layers for path in layer.full_precision)

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
    header = (
      "Layer",
      "Type",
      "1-bit params",
      "32-bit params",
      "alphas",
      "float32 KiB",
      "binary KiB",
    )
    rows = [
      (
        layer.path,
        layer.kind,
        f"{layer.binary_params:,}",
        f"{layer.float_params:,}",
        f"{layer.alphas:,}",
        f"{layer.float32_bytes / 1024:.2f}",
        f"{layer.binary_bytes / 1024:.2f}",
      )
      for layer in self.layers
    ]
    total = (
      "Total",
      "",
      f"{self.binary_params:,}",
      f"{self.float_params:,}",
      f"{self.alphas:,}",
      f"{self.float32_bytes / 1024:.2f}",
      f"{self.binary_bytes / 1024:.2f}",
    )
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
    if self.full_precision:
      lines.append(f"Full precision kernels: {', '.join(self.full_precision)}")
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
    return packing._detect_layout(mat, "")
  except ValueError:
    return None


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


def summary(model: nnx.Module, print_fn: Callable[[str], None] | None = print) -> ModelSummary:
  """Parameter counts by bit-width and memory of a binarized NNX model.

  For each layer: the 1-bit weights, the 32-bit parameters and batch
  statistics, the number of alphas, the memory with everything in float32,
  and the memory in deployed binary form (1 bit per binarized weight plus one
  float32 per alpha); then the totals.

  The 1-bit weights are the :class:`lab_optax.nnx.BinaryParam` kernels (which
  the binary layers binarize in their forward pass, so they count before
  training too), packed kernels, and, in any layer (plain ``nnx.Linear``,
  ``nnx.Conv``, ...), every floating ``nnx.Param`` with ``ndim >= 2`` whose
  values are binarized, as :func:`lab_optax.lab` leaves them with its default
  mask: one magnitude per tensor, or one per output channel (last axis) when a
  channel holds more than one weight; one alpha per tensor or per channel.
  The other such kernels are kept in full precision and named in
  :attr:`ModelSummary.full_precision` and on the table's last line.

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
  """
  layers = []
  for path, module in nnx.iter_modules(model):
    binary = floating = alphas = 0
    full_precision = []
    for name, value in vars(module).items():
      if not isinstance(value, (nnx.Param, nnx.BatchStat)):
        continue
      array = value.get_value()
      size = int(np.prod(np.shape(array)))  # a PackedBinary keeps the kernel's shape
      if isinstance(value, BinaryParam) or isinstance(array, PackedBinary):
        binary += size
        alphas += _alphas(array)
        continue
      kernel = isinstance(value, nnx.Param) and _is_kernel(array)
      layout = _binarized_layout(array) if kernel else None
      if layout is not None:
        binary += size
        alphas += array.shape[-1] if layout else 1
      else:
        floating += size
        if kernel:
          full_precision.append("/".join(map(str, (*path, name))))
    if binary or floating:
      layer_name = "/".join(map(str, path)) or "<model>"
      layers.append(
        LayerSummary(
          layer_name, type(module).__name__, binary, floating, alphas, tuple(full_precision)
        )
      )
  result = ModelSummary(tuple(layers))
  if print_fn is not None:
    print_fn(result.table())
  return result

"""Packing of quantized weights, XNOR-popcount products and a packed file format.

Params trained with lab_optax hold quantized weights: ``alpha * sign(latent)``
(binary: two values ``+-alpha`` per tensor or output channel), or the levels
of a ternary or m-bit projection times their scales. This package stores such
a leaf in as few bits as its level set needs, and runs inference on the packed
form. Its four parts:

* :mod:`.bits`: :func:`pack_bits` (signs, 32 to a ``uint32`` word) and
  :func:`xnor_matmul` (the exact product of two packed {-1, +1} matrices).
* :mod:`.leaves`: :class:`PackedBinary` (1 bit per weight) and
  :class:`PackedQuantized` (sign-magnitude bit planes: 2 bits per ternary
  weight, ``m`` per m-bit weight), :func:`pack` and :func:`unpack`.
* :mod:`.ops`: :func:`binary_dense`, :func:`xnor_dense`, :func:`binary_conv`
  and :func:`xnor_conv` on packed kernels.
* :mod:`.format`: :func:`save_packed` / :func:`load_packed`, one ``.npz``
  file with a checksum.
"""

from lab_optax._src.packing.bits import pack_bits, xnor_matmul
from lab_optax._src.packing.format import load_packed, save_packed
from lab_optax._src.packing.leaves import (
  LOW_BIT_SETS,
  Packed,
  PackedBinary,
  PackedQuantized,
  find_level_set,
  is_packed,
  pack,
  unpack,
)
from lab_optax._src.packing.ops import (
  binary_conv,
  binary_dense,
  normalize_padding,
  xnor_conv,
  xnor_dense,
)

__all__ = [
  "LOW_BIT_SETS",
  "Packed",
  "PackedBinary",
  "PackedQuantized",
  "binary_conv",
  "binary_dense",
  "find_level_set",
  "is_packed",
  "load_packed",
  "pack",
  "pack_bits",
  "normalize_padding",
  "save_packed",
  "unpack",
  "xnor_conv",
  "xnor_dense",
  "xnor_matmul",
]

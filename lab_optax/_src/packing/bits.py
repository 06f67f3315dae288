"""Bit packing and the XNOR-popcount product.

Bit layout: element ``i`` of the packed axis is bit ``i % 32`` (least
significant first) of word ``i // 32``; a set bit means ``x >= 0``, i.e.
``binary_sign(x) = +1``. When the axis length ``K`` is not a multiple of 32 the
last word is padded with zero bits. Both operands of :func:`xnor_matmul` come
from :func:`pack_bits`, so their padding bits are equal, their XOR is 0 and the
padding adds nothing to the popcount: ``K - 2 * popcount`` with the true ``K``
is exact whatever the padding length.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_WORD = 32


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

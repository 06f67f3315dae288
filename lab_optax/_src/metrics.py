"""Training metrics of quantized networks: flip ratio and sparsity."""

from typing import Any

import jax
import jax.numpy as jnp

from lab_optax._src import masks as masks_lib
from lab_optax._src import projections
from lab_optax._src.ste import _channel_axes, level_codes


def _selected_pairs(old_params: Any, new_params: Any, mask: masks_lib.MaskOrFn):
  flags = jax.tree.leaves(masks_lib.resolve_mask(mask, old_params))
  old_leaves, new_leaves = jax.tree.leaves(old_params), jax.tree.leaves(new_params)
  if len(old_leaves) != len(new_leaves):
    raise ValueError(
      f"old_params has {len(old_leaves)} leaves but new_params has {len(new_leaves)}"
    )
  return [(old, new) for selected, old, new in zip(flags, old_leaves, new_leaves) if selected]


def _codes(w: jax.Array, projection: projections.Projection | None) -> jax.Array:
  """The codes of quantized weights, read from their values."""
  w = jnp.asarray(w)
  if projection is None:
    # The sign, with zero a code of its own: exact for binary and ternary weights
    # whatever their scales (binary weights are never zero, so this is sign(w) there).
    return jnp.sign(w)
  if w.ndim == 0 or w.size == 0:
    return level_codes(w, projection)[0]
  codes, _, exact = level_codes(w, projection)
  axes = _channel_axes(w)
  if axes is None:
    return codes
  return jnp.where(exact, codes, level_codes(w, projection, axes)[0])


def flip_ratio(
  old_params: Any,
  new_params: Any,
  mask: masks_lib.MaskOrFn = None,
  *,
  projection: projections.Projection | None = None,
) -> jax.Array:
  """The fraction of quantized weights whose code changed between two params.

  Larq's ``FlipRatio`` metric for lab_optax, for any level set. A weight
  flips when its code changes; a change of scale alone (every weight of a
  tensor moving together) is not a flip. The codes are read from the values:

  * by default, the sign with zero as a code of its own (``-1``, ``0``,
    ``+1``). For binary weights (never zero) this counts sign flips, as
    before; for ternary weights (one scale or two, per tensor or per channel)
    it counts every move between ``0`` and ``+-alpha`` and between ``+alpha``
    and ``-alpha``, exactly. For m-bit weights it counts sign changes and moves
    to and from zero, not moves between two nonzero levels of one sign;
  * with ``projection`` (e.g. the ``lab_optax.projections.MbitProjection``
    of :func:`lab_optax.laq`), the projection's level of each weight, its
    scale read from the values as :func:`lab_optax.quantize_ste` reads it
    (the largest magnitude on the top level, per tensor or per output
    channel): every level change counts.

  The ratio is taken over all selected weights together. Jittable, so it can
  be computed inside a training step.

  Args:
    old_params: params before an update.
    new_params: params after it, with the same structure.
    mask: the quantized leaves, as for :func:`lab_optax.lab` (``None``: every
      floating leaf with ``ndim >= 2``).
    projection: the level set whose codes are compared (``None``: sign and zero).

  Returns:
    A float32 scalar in ``[0, 1]`` (0 when nothing is quantized).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import flip_ratio
    >>> old = {"w": jnp.array([[1.0, -1.0], [1.0, 1.0]]), "b": jnp.zeros(2)}
    >>> new = {"w": jnp.array([[1.0, 1.0], [-1.0, 1.0]]), "b": jnp.ones(2)}
    >>> flip_ratio(old, new)
    Array(0.5, dtype=float32)
    >>> ternary = {"w": jnp.array([[0.5, 0.0], [-0.5, 0.5]])}
    >>> flip_ratio(ternary, {"w": jnp.array([[0.7, 0.7], [0.0, 0.7]])})  # 0 -> a, -a -> 0
    Array(0.5, dtype=float32)
  """
  flips, total = jnp.zeros([], jnp.float32), 0
  for old, new in _selected_pairs(old_params, new_params, mask):
    flips += jnp.sum(_codes(old, projection) != _codes(new, projection), dtype=jnp.float32)
    total += old.size
  return flips / max(total, 1)


def sparsity(params: Any, mask: masks_lib.MaskOrFn = None) -> jax.Array:
  """The fraction of exact zeros among the quantized weights.

  For ternary weights (:func:`lab_optax.lat`, :func:`lab_optax.twn`,
  :func:`lab_optax.absmean_ternary`) and m-bit ones (:func:`lab_optax.laq`)
  this is the fraction of zero codes, which a sparse kernel skips; binary
  weights are never zero. Taken over all selected weights together, and
  jittable.

  Args:
    params: a pytree of arrays.
    mask: the quantized leaves, as for :func:`lab_optax.lab` (``None``: every
      floating leaf with ``ndim >= 2``).

  Returns:
    A float32 scalar in ``[0, 1]`` (0 when nothing is selected).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import sparsity
    >>> sparsity({"w": jnp.array([[0.5, 0.0], [-0.5, 0.0]]), "b": jnp.zeros(2)})
    Array(0.5, dtype=float32)
  """
  zeros, total = jnp.zeros([], jnp.float32), 0
  for leaf in _selected_pairs(params, params, mask):
    zeros += jnp.sum(jnp.asarray(leaf[0]) == 0, dtype=jnp.float32)
    total += leaf[0].size
  return zeros / max(total, 1)

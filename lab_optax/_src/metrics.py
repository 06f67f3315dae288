"""Training metrics of binarized networks."""

from typing import Any

import jax
import jax.numpy as jnp

from lab_optax._src import masks as masks_lib
from lab_optax._src.projections import binary_sign


def flip_ratio(old_params: Any, new_params: Any, mask: masks_lib.MaskOrFn = None) -> jax.Array:
  """The fraction of binarized weights whose sign changed between two params.

  Larq's ``FlipRatio`` metric for lab_optax: signs follow ``binary_sign``
  (``sign(0) = +1``), and the ratio is taken over all binarized weights
  together. Jittable, so it can be computed inside a training step.

  Args:
    old_params: params before an update.
    new_params: params after it, with the same structure.
    mask: the binarized leaves, as for :func:`lab_optax.lab` (``None``: every
      floating leaf with ``ndim >= 2``).

  Returns:
    A float32 scalar in ``[0, 1]`` (0 when nothing is binarized).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import flip_ratio
    >>> old = {"w": jnp.array([[1.0, -1.0], [1.0, 1.0]]), "b": jnp.zeros(2)}
    >>> new = {"w": jnp.array([[1.0, 1.0], [-1.0, 1.0]]), "b": jnp.ones(2)}
    >>> flip_ratio(old, new)
    Array(0.5, dtype=float32)
  """
  flags = jax.tree.leaves(masks_lib.resolve_mask(mask, old_params))
  old_leaves, new_leaves = jax.tree.leaves(old_params), jax.tree.leaves(new_params)
  if len(old_leaves) != len(new_leaves):
    raise ValueError(
      f"old_params has {len(old_leaves)} leaves but new_params has {len(new_leaves)}"
    )
  flips, total = jnp.zeros([], jnp.float32), 0
  for selected, old, new in zip(flags, old_leaves, new_leaves):
    if selected:
      flips += jnp.sum(binary_sign(old) != binary_sign(new), dtype=jnp.float32)
      total += old.size
  return flips / max(total, 1)

"""Which leaves of a parameter tree are binarized."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# None, a pytree of bools like params, or a callable params -> such a pytree.
MaskOrFn = Any


def is_floating(x: Any) -> bool:
  """Whether ``x`` is an array (or array-like) of a floating dtype."""
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def default_mask(params: Any) -> Any:
  """The default mask: every floating leaf with ``ndim >= 2``.

  That selects the kernels of dense, convolutional and recurrent layers and
  leaves biases, batch-norm scales and other vectors in full precision, as in
  the paper.

  Args:
    params: a pytree of arrays.

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """
  return jax.tree.map(lambda p: bool(is_floating(p) and jnp.ndim(p) >= 2), params)


def _first_structure_mismatch(params: Any, mask: Any) -> str:
  p_paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
  m_paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(mask)]
  for p, m in zip(p_paths, m_paths):
    if p != m:
      return f"params have a leaf at {p or '<root>'} where the mask has {m or '<root>'}"
  if len(p_paths) > len(m_paths):
    return f"the mask has no entry for the params leaf at {p_paths[len(m_paths)] or '<root>'}"
  if len(m_paths) > len(p_paths):
    return f"the mask has an extra entry at {m_paths[len(p_paths)] or '<root>'}"
  return "the containers differ although the leaf paths agree"


def _to_bool(value: Any, path: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"mask entry at {path} is a traced value; a mask must be made of "
      "Python bools (compute it from shapes and dtypes, not from values)"
    )
  arr = np.asarray(value)
  if arr.shape != () or arr.dtype != np.bool_:
    raise ValueError(f"mask entry at {path} must be a bool, got {value!r}")
  return bool(arr)


def resolve_mask(mask: MaskOrFn, params: Any) -> Any:
  """Turns a mask argument into a validated pytree of Python bools.

  Args:
    mask: ``None`` (use :func:`default_mask`), a pytree of bools with the
      structure of ``params``, or a callable ``params -> such a pytree``.
    params: the parameters the mask applies to.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Raises:
    ValueError: if the mask's structure differs from the params' (naming the
      first mismatching path), if an entry is not a bool, or if it selects a
      leaf that is not floating point (naming that leaf).
  """
  if mask is None:
    return default_mask(params)
  tree = mask(params) if callable(mask) else mask
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
      "mask must have the structure of params: " + _first_structure_mismatch(params, tree)
    )
  leaves_with_path = jax.tree_util.tree_leaves_with_path(params)
  flat = []
  for (path, p), m in zip(leaves_with_path, jax.tree.leaves(tree)):
    name = jax.tree_util.keystr(path) or "<root>"
    selected = _to_bool(m, name)
    if selected and not is_floating(p):
      raise ValueError(
        f"mask selects the leaf at {name} for binarization, but its dtype "
        f"{jnp.result_type(p)} is not floating point"
      )
    flat.append(selected)
  return jax.tree.unflatten(jax.tree.structure(params), flat)

"""Which leaves of a parameter tree are binarized."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# None, a pytree of bools like params, or a callable params -> such a pytree.
MaskOrFn = Any


def is_floating(x: Any) -> bool:
  """Whether ``x`` is an array (or array-like) of a floating dtype."""
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def is_inexact(x: Any) -> bool:
  """Whether ``x`` is an array (or array-like) of a floating or complex dtype."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def is_mask_fn(mask: Any) -> bool:
  """Whether ``mask`` is a function of the params rather than a pytree of bools.

  As :func:`optax.masked`: a callable pytree (an equinox module, say) whose
  leaves are bools is a mask, not a function; ``mask`` is called only when it
  has leaves and every one of them is callable (a plain function is its own
  single leaf).
  """
  leaves = jax.tree.leaves(jax.tree.map(callable, mask))
  return bool(leaves) and all(leaves)


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


def _match_by_path(params: Any, mask: Any) -> list[tuple[str, Any]]:
  """Pairs each params leaf with the mask entry whose key path is a prefix of its path.

  Matching by key path lets one mask serve the trees an optimizer sees: an
  ``nnx.State`` of ``nnx.Variable`` at ``init`` and of plain arrays at
  ``update``, or a plain dict with the same keys.
  """
  p_leaves = jax.tree_util.tree_leaves_with_path(params)
  m_leaves = jax.tree_util.tree_leaves_with_path(mask)
  out, j = [], 0
  for m_path, m_value in m_leaves:
    start = j
    while j < len(p_leaves) and p_leaves[j][0][: len(m_path)] == m_path:
      out.append((jax.tree_util.keystr(p_leaves[j][0]) or "<root>", m_value))
      j += 1
    if j == start:
      here = jax.tree_util.keystr(p_leaves[j][0]) if j < len(p_leaves) else "the end of params"
      raise ValueError(
        "mask must have the structure of params: the mask has an entry at "
        f"{jax.tree_util.keystr(m_path) or '<root>'} where params have {here or '<root>'}"
      )
  if j < len(p_leaves):
    raise ValueError(
      "mask must have the structure of params: the mask has no entry for the params "
      f"leaf at {jax.tree_util.keystr(p_leaves[j][0]) or '<root>'}"
    )
  return out


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
      structure of ``params``, or a callable ``params -> such a pytree`` (a
      callable pytree of bools, such as an equinox module, is a mask, as in
      :func:`optax.masked`; see :func:`is_mask_fn`). A mask entry may also stand for a whole subtree of params (a prefix, as in
      :func:`optax.masked`), and containers are matched by key path, so a dict
      mask fits an ``nnx.State`` of params with the same keys.
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
  tree = mask(params) if is_mask_fn(mask) else mask
  flat = []
  for (name, m), p in zip(_match_by_path(params, tree), jax.tree.leaves(params)):
    selected = _to_bool(m, name)
    if selected and not is_floating(p):
      raise ValueError(
        f"mask selects the leaf at {name} for binarization, but its dtype "
        f"{jnp.result_type(p)} is not floating point"
      )
    flat.append(selected)
  return jax.tree.unflatten(jax.tree.structure(params), flat)

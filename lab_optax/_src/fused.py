"""Row-blocked update of a binarized leaf: the reference step without full-size temporaries.

:func:`lab_optax.projected_adam` updates a binarized leaf with a few lines of
``jnp`` in ``transform.py``: Adam's moments, the latent weights, ``d``, the
sums behind ``alpha`` and the projection. Those lines are the reference. On GPU
and TPU, XLA fuses them into loops with several outputs, and the reference
reads and writes each array about once. XLA:CPU gives every fused loop one
output and computes a ``sqrt`` or a divide that two loops need only once, into
memory; it also recomputes the cheap clip in every loop that reads the new
latent weights, so the old ones must outlive the update. The reference then
keeps ``d`` and the Adam step in temporaries the size of the leaf and copies
the latent weights, and temporaries of more than about 32 MB are fresh,
page-faulting memory on every call: a 10M-weight step took six to eight times
as long as Adam's.

Here Adam's moments are updated first, in place, by loops that XLA:CPU runs on
all cores as Adam's own. Then a ``fori_loop`` walks the rows of the leaf: each
block's latent weights are written in place with ``dynamic_update_slice`` and
read back (see ``update_rows``), and the terms of ``alpha``'s sums are added
into block-sized accumulators that are reduced once after the loop.
Temporaries are a few blocks in size. The price: XLA:CPU runs an in-place
``dynamic_update_slice`` on one thread, so the latent weights and the sums are
done by one core where Adam's loops use all of them.

Only float32 state qualifies, since the new latent weights are read back from
it. The results are the reference's up to rounding: the order of the additions
in the sums, and now and then the last bit of a moment (the two paths are
different XLA programs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lab_optax._src import projections

# Largest row block, in elements (64 KiB of float32). From 2**15 elements up,
# XLA:CPU splits the loop body's accumulator fusion over two threads
# (``outer_dimension_partitions`` in the compiled HLO), a dispatch per block,
# which made the step up to 1.5x slower when the second core was free; 2**14
# was the fastest block size in the sweeps of
# ``python benchmarks/bench_optimizer.py --part blocks`` in docs/results.md.
# Smaller blocks pay more per iteration.
BLOCK_ELEMENTS = 1 << 14
# Rows longer than this keep the reference update (a block is at least one row).
MAX_ROW_ELEMENTS = 1 << 17
# XLA:CPU does not share the blocks' temporaries between leaves, and more than
# about 32 MB of temporaries page-faults on every call: with many binarized
# leaves the blocks shrink to keep all of them within this budget.
TEMP_BYTES = 16 << 20
# With the automatic choice, smaller leaves keep the reference update.
MIN_ELEMENTS = 1 << 12

# Scale functions whose alpha is a ratio of sums over the leaf, and the sums
# each needs: of d, of d * |w| and of |w|. Other scale functions, which this
# module cannot split into blocks, get the reference update.
_SUMS = {
  projections.lab_scale: ("d", "dw"),
  projections.bwn_scale: ("w",),
  projections.binary_connect_scale: (),
}


def supports(scale_fn, m: jax.Array, v: jax.Array, w: jax.Array) -> bool:
  """Whether :func:`update_binarized` gives the reference step for a leaf.

  Args:
    scale_fn: the transformation's scale function.
    m: the leaf's first moment.
    v: its second moment.
    w: its latent weights.

  Returns:
    ``True`` for :func:`~lab_optax.projections.lab_scale`,
    :func:`~lab_optax.projections.bwn_scale` and
    :func:`~lab_optax.projections.binary_connect_scale`, float32 moments and
    latent weights, at least two rows (all axes but the last) and rows of at
    most :data:`MAX_ROW_ELEMENTS` elements.
  """
  if scale_fn not in _SUMS or w.ndim < 2 or w.size == 0:
    return False
  if any(x.dtype != jnp.float32 for x in (m, v, w)):
    return False
  cols = w.shape[-1]
  return w.size // cols >= 2 and cols <= MAX_ROW_ELEMENTS


def block_elements(leaves: int) -> int:
  """Elements per row block when ``leaves`` binarized leaves are updated by blocks."""
  # Per leaf: the block of d and at most three accumulators, float32.
  return max(1, min(BLOCK_ELEMENTS, TEMP_BYTES // (16 * max(leaves, 1))))


def update_binarized(
  g: jax.Array,
  m: jax.Array,
  v: jax.Array,
  w: jax.Array,
  *,
  scale_fn,
  learning_rate: jax.typing.ArrayLike,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  bc1: jax.Array,
  bc2: jax.Array,
  clip: jax.typing.ArrayLike | None,
  per_channel: bool,
  guard_zero_d: bool,
  block: int = BLOCK_ELEMENTS,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Adam, the clip and ``alpha``'s sums for one binarized leaf, by row blocks.

  The arithmetic is the reference's (``projected_adam`` in ``transform.py``);
  only the order of the additions in the sums differs. For leaves that
  :func:`supports` accepts.

  Args:
    g: the gradient, in any floating dtype.
    m: the first moment (float32).
    v: the second moment (float32).
    w: the latent weights (float32).
    scale_fn: :func:`~lab_optax.projections.lab_scale`,
      :func:`~lab_optax.projections.bwn_scale` or
      :func:`~lab_optax.projections.binary_connect_scale`.
    learning_rate: the step's learning rate.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to ``sqrt(v_hat)``.
    bc1: ``1 - b1 ** t``.
    bc2: ``1 - b2 ** t``.
    clip: bound of the latent weights, or ``None``.
    per_channel: one alpha per slice along the last axis.
    guard_zero_d: ``d`` may be zero (``eps`` is zero or traced).
    block: elements per row block, at most; see :func:`block_elements`.

  Returns:
    ``(m, v, w, alpha)``: the leaf's new state and its unrounded alpha,
    float32 of shape ``()`` (``(out,)`` per channel).
  """
  shape = w.shape
  cols = shape[-1]
  rows = w.size // cols
  # The moments need nothing but the gradient: XLA:CPU updates them in place
  # with loops that use every core, as Adam's, before the loop below. In the
  # leaf's own shape: computed on a reshaped view, they were copied back.
  g32 = g.astype(jnp.float32)
  m = b1 * m + (1 - b1) * g32
  v = b2 * v + (1 - b2) * g32 * g32
  new_m, new_v = m, v
  m, v, w = (x.reshape(rows, cols) for x in (m, v, w))
  # Without eps, sum(d) can be zero and alpha falls back to mean(|w|), as in lab_scale.
  names = _SUMS[scale_fn] + (("w",) if scale_fn is projections.lab_scale and guard_zero_d else ())

  # At least two blocks: XLA inlines a loop of one iteration, and then no longer
  # updates the latent weights in place.
  block_rows = max(1, min(block // cols, rows // 2))
  count = -(-rows // block_rows)

  def update_block(i, w):
    """Updates block ``i`` of ``w``; returns it and the block's terms of the sums.

    The last block ends at the last row: where ``block_rows`` does not divide
    the rows it overlaps the one before, and the rows already updated are
    written back unchanged and left out of the sums. (A separate partial block
    after the loop made XLA copy the leaf.)
    """
    start = jnp.minimum(i * block_rows, rows - block_rows)
    fresh = (start + lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)) >= i * block_rows

    def rows_of(x):
      return lax.dynamic_slice_in_dim(x, start, block_rows)

    d = jnp.sqrt(rows_of(v) / bc2) + eps
    step = (rows_of(m) / bc1) / (jnp.where(d > 0, d, 1) if guard_zero_d else d)
    old_w = rows_of(w)
    new_w = old_w - learning_rate * step
    if clip is not None:
      new_w = jnp.clip(new_w, -clip, clip)
    w = lax.dynamic_update_slice_in_dim(w, jnp.where(fresh, new_w, old_w), start, 0)
    if not names:  # BinaryConnect: alpha = 1
      return w, jnp.zeros((0, block_rows, cols), jnp.float32)
    # The new latent weights are read back from w instead of reused: XLA:CPU
    # would recompute the clip from the old rows in the loop that adds up the
    # terms, so the old rows would have to outlive the in-place write, and it
    # would copy the whole leaf on every iteration to keep them.
    abs_w = jnp.abs(rows_of(w))
    terms = {"d": lambda: d, "dw": lambda: d * abs_w, "w": lambda: abs_w}
    return w, jnp.where(fresh, jnp.stack([terms[name]() for name in names]), 0.0)

  # The terms are added up elementwise and reduced once after the loop: a
  # reduction in the loop costs a dispatch to the thread pool per block.
  def body(i, carry):
    w, acc = carry
    w, terms = update_block(i, w)
    return w, acc + terms

  acc = jnp.zeros((len(names), block_rows, cols), jnp.float32)
  w, acc = lax.fori_loop(0, count, body, (w, acc))
  sums = jnp.sum(acc, axis=1)
  sums = dict(zip(names, sums if per_channel else jnp.sum(sums, axis=1)))

  n = rows if per_channel else rows * cols
  if scale_fn is projections.binary_connect_scale:
    alpha = jnp.ones((cols,) if per_channel else (), jnp.float32)
  elif scale_fn is projections.bwn_scale:
    alpha = sums["w"] / n
  else:
    positive = sums["d"] > 0
    alpha = sums["dw"] / jnp.where(positive, sums["d"], 1)
    if guard_zero_d:
      alpha = jnp.where(positive, alpha, sums["w"] / n)
  return new_m, new_v, w.reshape(shape), alpha

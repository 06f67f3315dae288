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
all cores as Adam's own. Then a ``while_loop`` walks the rows of the leaf: each
block's latent weights are written in place with ``dynamic_update_slice`` and
read back, and the terms of ``alpha``'s sums are added into block-sized
accumulators that the loop carries and that are reduced once after it.
Temporaries are a few blocks in size.

XLA:CPU runs an in-place ``dynamic_update_slice`` on one thread, but its
runtime runs independent parts of a program at the same time, one leaf's loop
beside another's, when no buffer is shared between them. The loop is written
so that none is:

- nothing in the loop's body lives outside its carry: the counter is advanced
  after every read of the old one (else XLA keeps a copy in a temporary),
  the row index is unsigned (a signed one is clamped into a temporary), ``d``
  is computed in the fused loop of each accumulator instead of once (the
  ``sqrt`` would be kept in a temporary), and two terms of the sums share one
  complex64 accumulator (a stack of them would read that temporary);
- the loop's inputs are computed from this leaf's moments, so the loop becomes
  ready on the thread that finished them rather than, with all the others, on
  the thread that computed a shared input last.

XLA reuses the memory of a temporary once it is dead in its sequential order
of the program, which would make the next leaf's loop wait for this one; for
the same reason the shared bias corrections are kept alive until after the
loop. This took the 10M-parameter step from 2.1x Adam's time to 1.4x to 1.55x
on two cores (docs/results.md); the results do not depend on it. The
dependencies are exact ones, and under ``jax.vmap`` the counter's stays
unbatched (see :func:`_one_after`). The loop has no reverse-mode derivative:
``transform.py`` differentiates it as the reference.

16-bit state (``mu_dtype``, ``latent_dtype``, bfloat16 params) is rounded when
stored, while the step uses the unrounded values, so it cannot be read back:
for it the loop also updates the moments, computes every block from its old
rows and writes the rounded values after the last read of them (the sums
first, then the latent weights, then the moments), and it carries 16-bit
arrays as their bits (uint16), since XLA:CPU widens a 16-bit
``dynamic_update_slice`` to float32 over the whole array on every iteration.
Converting a 16-bit latent array to its bits and back costs XLA a copy of it,
the only temporary the size of a leaf. A float16 latent array keeps the
reference: float16 rounds weights below 3e-8 to zero, and the reference takes
their sign from the unrounded value.

The results are the reference's up to rounding: the order of the additions in
the sums, the bias corrections applied as factors rather than divisors (each
product in the reference's order, so that what overflows there overflows
here), and now and then the last bit of a moment (the two paths are different
XLA programs), which can move a 16-bit stored value by one unit of its last
place.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

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

_MOMENT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LATENT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def use_blocked(
  implementation: str | None, projection, m: Any, v: Any, w: Any, guard_zero_d: bool = True
) -> bool:
  """Whether a quantized leaf gets the blocked update: the one choice of the path.

  Args:
    implementation: the transformation's ``implementation`` argument:
      ``"reference"``, ``"blocked"`` or ``None`` (automatic: blocked for
      leaves of at least :data:`MIN_ELEMENTS` elements in a single-device
      process; ``update_binarized`` is then picked for XLA:CPU only, by
      ``jax.lax.platform_dependent``).
    projection: the transformation's projection.
    m: the leaf's first moment.
    v: its second moment.
    w: its latent weights (``optax.MaskedNode()`` for a leaf not quantized).
    guard_zero_d: ``d`` may be zero (``eps`` is zero or traced).

  Returns:
    Whether :func:`update_binarized` may update the leaf.
  """
  if implementation == "reference" or not supports(projection, m, v, w, guard_zero_d):
    return False
  return implementation == "blocked" or (w.size >= MIN_ELEMENTS and jax.device_count() == 1)


def supports(projection, m: Any, v: Any, w: Any, guard_zero_d: bool = True) -> bool:
  """Whether :func:`update_binarized` gives the reference step for a leaf.

  Args:
    projection: the transformation's projection.
    m: the leaf's first moment.
    v: its second moment.
    w: its latent weights.
    guard_zero_d: ``d`` may be zero (``eps`` is zero or traced).

  Returns:
    ``True`` for a projection with a blocked solver
    (``projection.blocked_solver(guard_zero_d)`` is not ``None``: LAB, BWN,
    BinaryConnect, TWN and absmean always, LATa with one scale and LAQ with a
    positive ``eps``); float32, bfloat16 or float16 moments; float32 or
    bfloat16 latent weights (a float16 one can round a tiny weight to zero, and
    with it the sign that the reference takes from the unrounded weight), and
    all of them float32 for a solver that passes over the leaf again after the
    update (``rounds > 0``: it reads the stored values, which 16-bit state
    rounds); at least two rows (all axes but the last) and rows of at most
    :data:`MAX_ROW_ELEMENTS` elements.
  """
  hook = getattr(projection, "blocked_solver", None)
  solver = None if hook is None else hook(guard_zero_d)
  if solver is None or not hasattr(w, "ndim"):
    return False
  if w.ndim < 2 or w.size == 0:
    return False
  if any(x.dtype not in _MOMENT_DTYPES for x in (m, v)) or w.dtype not in _LATENT_DTYPES:
    return False
  if solver.rounds and any(x.dtype != jnp.float32 for x in (m, v, w)):
    return False
  cols = w.shape[-1]
  return w.size // cols >= 2 and cols <= MAX_ROW_ELEMENTS


def _one_after(*arrays: jax.Array) -> jax.Array:
  """An int32 1 that XLA computes only after ``arrays``: an order without a value.

  ``min(1, (bits & 0x7fffffff) | 1)`` of one element of each array is 1
  whatever the bits, which XLA does not see, so it keeps the dependency.
  Explicitly sharded arrays give no dependency: they are not the single-device
  case that the dependencies are for. Under ``jax.vmap`` the 1 is one for the
  whole batch, not batched: the loop's counter depends on it, and a batched
  counter would make the loop run with a batched condition.
  """
  return _one_after_all(arrays)


@jax.custom_batching.custom_vmap
def _one_after_all(arrays: tuple[jax.Array, ...]) -> jax.Array:
  one = jnp.int32(1)
  for x in arrays:
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    if any(axis is not None for axis in spec):
      continue  # an element of an explicitly sharded array cannot be sliced out
    element = jnp.real(x).reshape(-1)[0].astype(jnp.float32)
    bits = lax.bitcast_convert_type(element, jnp.int32)
    one = jnp.minimum(one, (bits & 0x7FFFFFFF) | 1)
  return one


@_one_after_all.def_vmap
def _one_after_batched(axis_size, in_batched, arrays):
  del axis_size, in_batched
  return _one_after_all(arrays), False


def _as_bits(x: jax.Array) -> jax.Array:
  """A 16-bit float array as its bits (uint16); other arrays as they are."""
  return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x: jax.Array, dtype) -> jax.Array:
  """The inverse of :func:`_as_bits` for an array of ``dtype``."""
  return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _pack(terms: list[jax.Array]) -> tuple[jax.Array, ...]:
  """The float32 terms of the sums, two by two as the real and imaginary parts of complex64.

  Each accumulator is updated by its own fused loop, which computes ``d``
  itself. A stack of the terms in one accumulator would be a single loop too,
  but XLA:CPU then reads ``d`` from a temporary, which ties the leaves' loops
  together (see the module docstring).
  """
  pairs = [lax.complex(a, b) for a, b in zip(terms[0::2], terms[1::2])]
  return tuple(pairs + terms[len(pairs) * 2 :])


def _unpack(acc: tuple[jax.Array, ...]) -> list[jax.Array]:
  """The accumulators of :func:`_pack` as float32 arrays, one per term."""
  out = []
  for a in acc:
    out += [jnp.real(a), jnp.imag(a)] if jnp.iscomplexobj(a) else [a]
  return out


def _accumulate(acc, terms: dict[str, jax.Array], fresh):
  """``acc`` (the sums packed by :func:`_pack`) with a block's terms added, by name."""
  terms = [terms[k] for k in sorted(terms)]
  if fresh is not None:  # rows of an overlapping last block already counted
    terms = [jnp.where(fresh, t, 0.0) for t in terms]
  return tuple(a + t for a, t in zip(acc, _pack(terms)))


def _initial_acc(names, shape, zero):
  """Accumulators of :func:`_accumulate` for the terms ``names`` of blocks of ``shape``."""
  return _pack([jnp.full(shape, zero, jnp.float32) for _ in names])


def _reduce_acc(acc, names, per_channel: bool) -> dict[str, jax.Array]:
  """The sums over the leaf (per channel: over its rows) from the block accumulators."""
  acc = tuple(jnp.sum(a, axis=0) for a in acc)
  if not per_channel:
    acc = tuple(jnp.sum(a) for a in acc)
  return dict(zip(sorted(names), _unpack(acc)))


def block_elements(leaves: int) -> int:
  """Elements per row block when ``leaves`` binarized leaves are updated by blocks."""
  # Per leaf, per element of a block: at most three float32 terms of the sums
  # (in accumulators carried by the loop) and one temporary.
  return max(1, min(BLOCK_ELEMENTS, TEMP_BYTES // (16 * max(leaves, 1))))


def update_binarized(
  g: jax.Array,
  m: jax.Array,
  v: jax.Array,
  w: jax.Array,
  *,
  projection,
  learning_rate: jax.typing.ArrayLike,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  bc1: jax.Array,
  bc2: jax.Array,
  clip: jax.typing.ArrayLike | None,
  per_channel: bool,
  weight_decay: jax.typing.ArrayLike = 0.0,
  guard_zero_d: bool,
  block: int = BLOCK_ELEMENTS,
  scale_old: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """Adam, the clip and the scale's sums for one quantized leaf, by row blocks.

  The arithmetic is the reference's (``projected_adam`` in ``transform.py``)
  up to rounding: the order of the additions in the sums differs, and the bias
  corrections are applied as factors computed once. For leaves that
  :func:`supports` accepts.

  Args:
    g: the gradient, in any floating dtype.
    m: the first moment (float32, bfloat16 or float16).
    v: the second moment (float32, bfloat16 or float16).
    w: the latent weights (float32 or bfloat16).
    projection: a projection with a blocked solver
      (:meth:`~lab_optax.projections.Projection.blocked_solver`: the terms of
      the sums over the leaf that its scale needs, and the scale from them).
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
    scale_old: the previous step's scale, flat (``()`` or ``(out,)``), for a
      solver that starts from the previous step's codes
      (``projection.codes(w, scale_old)`` of the old latent weights ``w``).

  Returns:
    ``(m, v, w, scale, aux)``: the leaf's new moments in their dtypes, the new
    latent weights in float32 (rounded to their dtype if it is narrower), the
    unrounded scale, float32 of shape ``()`` (``(out,)`` per channel), and
    what ``projection.codes_from`` needs (``None`` if the solver has no
    ``aux``).
  """
  # Array hyperparameters (NumPy scalars, float64 under jax_enable_x64) are
  # used in float32, as the state is; Python numbers stay weakly typed.
  learning_rate, b1, b2, eps, clip, weight_decay = (
    x if x is None or type(x) in (bool, int, float) else jnp.asarray(x, jnp.float32)
    for x in (learning_rate, b1, b2, eps, clip, weight_decay)
  )
  decay = not (type(weight_decay) in (int, float) and weight_decay == 0)
  shape = w.shape
  cols = shape[-1]
  rows = w.size // cols
  dtypes = m.dtype, v.dtype, w.dtype
  # float32 state: the moments need nothing but the gradient, and XLA:CPU
  # updates them in place with loops that use every core, as Adam's, before the
  # loop below, which reads them back. Narrower state is rounded when stored,
  # while the step uses the unrounded moments: they are updated in the loop.
  wide = all(dtype == jnp.float32 for dtype in dtypes)

  def moments(g32, m32, v32):
    return b1 * m32 + (1 - b1) * g32, b2 * v32 + (1 - b2) * g32 * g32

  if wide:
    # In the leaf's own shape: computed on a reshaped view, they were copied back.
    new_m, new_v = m, v = moments(g.astype(jnp.float32), m, v)
  solver = projection.blocked_solver(guard_zero_d)
  g, m, v, w = (x.reshape(rows, cols) for x in (g, m, v, w))
  # 16-bit state is carried as its bits: XLA:CPU widens a bfloat16 or float16
  # dynamic_update_slice to float32 over the whole array, on every iteration.
  m, v, w = map(_as_bits, (m, v, w))

  # Everything the loop reads besides the moments is made to depend on them,
  # the scalars included (computed per leaf from these copies of the bias
  # corrections), so the loop becomes ready on the thread that finished this
  # leaf's moments: shared inputs would make all loops ready at once on the
  # thread that computed them last, which runs them one after the other.
  one = _one_after(new_m, new_v) if wide else _one_after(g)
  zero = one - 1
  # The shared bias corrections are read once more after the loop (see the
  # end): the memory of a value dead early is given to a later temporary, here
  # another leaf's scalar, which then waits for every read of the first.
  keep_alive = bc1, bc2
  bc1 = bc1 * one.astype(bc1.dtype)
  bc2 = bc2 * one.astype(bc2.dtype)
  # A loop runs on one thread and its time goes mostly to the sqrt and the
  # divide per element. The reference divides by the bias corrections as well,
  # two more divides per element: the loop multiplies by factors computed once
  # instead, which made the step 6% to 8% faster (docs/results.md) and changes
  # the last bit of d and of the step now and then.
  # Each product keeps the reference's order, so a value that overflows there
  # overflows here (a d of inf gives a step of 0, as in optax.adam).
  inv_bc1 = 1 / bc1
  inv_bc2 = 1 / bc2
  # The same factor as another value, so that XLA does not merge the sums' d
  # with the update's (see _pack).
  inv_bc2_sums = inv_bc2 * one.astype(inv_bc2.dtype)

  # At least two blocks: XLA inlines a loop of one iteration, and then no longer
  # updates the latent weights in place.
  block_rows = max(1, min(block // cols, rows // 2))
  count = -(-rows // block_rows)
  # Where block_rows does not divide the rows, the last block ends at the last
  # row and overlaps the one before: its rows already updated are written back
  # unchanged and left out of the sums. (A separate partial block after the
  # loop made XLA copy the leaf.)
  overlap = rows % block_rows != 0

  def new_latent(old_w, m32, d):
    step = (m32 * inv_bc1) / (jnp.where(d > 0, d, 1) if guard_zero_d else d)
    w32 = old_w - learning_rate * (step + weight_decay * old_w if decay else step)
    return w32 if clip is None else jnp.clip(w32, -clip, clip)

  scale_shape = (cols,) if per_channel else ()
  block_shape = (block_rows, cols)
  zeros = jax.ShapeDtypeStruct(block_shape, jnp.float32)

  def term_names(ctx, warm):
    return sorted(jax.eval_shape(lambda a, d, c: solver.terms(ctx, a, d, c), zeros, zeros, warm))

  names = term_names(None, zeros if solver.warm else None)

  def add_terms(acc, d, abs_w, fresh, old_w):
    # The previous step's codes, as the reference gets them: those of the old
    # latent weights at the old scale.
    warm = projection.codes(old_w, scale_old, None) if solver.warm else None
    return _accumulate(acc, solver.terms(None, abs_w, d, warm), fresh if overlap else None)

  def body(carry):
    """Updates the block of ``block_rows`` rows at ``start``, adds its terms to the sums."""
    i, start, m, v, w, acc, _ = carry

    def rows_of(x):
      return lax.dynamic_slice_in_dim(x, start, block_rows)

    def read(x, dtype):  # the block of a state array, in float32
      return _from_bits(rows_of(x), dtype).astype(jnp.float32)

    def put(x, new, dtype):
      new = _as_bits(new.astype(dtype))
      new = jnp.where(fresh, new, rows_of(x)) if overlap else new
      return lax.dynamic_update_slice_in_dim(x, new, start, 0)

    fresh = (start + lax.broadcasted_iota(jnp.uint32, (block_rows, 1), 0)) >= i * block_rows
    if wide and solver.warm:
      # The sums need the old latent weights (the warm start's codes) and the
      # new ones: they are computed first, from the old rows, and the new rows
      # are written after them, as for 16-bit state below.
      d = jnp.sqrt(rows_of(v) * inv_bc2_sums) + eps
      old_w = rows_of(w)
      acc = add_terms(acc, d, jnp.abs(new_latent(old_w, rows_of(m), d)), fresh, old_w)
      d = jnp.sqrt(rows_of(v) * inv_bc2) + eps
      new_w = new_latent(rows_of(w), rows_of(m), d) * _one_after(*acc).astype(jnp.float32)
      w = put(w, new_w, jnp.float32)
      after = (w,)
    elif wide:
      d = jnp.sqrt(rows_of(v) * inv_bc2) + eps
      w = put(w, new_latent(rows_of(w), rows_of(m), d), jnp.float32)
      if names:
        # The new latent weights are read back from w instead of reused:
        # XLA:CPU would recompute the clip from the old rows in the loop that
        # adds up the terms, so the old rows would have to outlive the in-place
        # write, and it would copy the whole leaf on every iteration to keep
        # them. d is computed again, in another form so that XLA does not merge
        # the two and keep d in a temporary (see _pack).
        d = jnp.sqrt(rows_of(v) * inv_bc2_sums) + eps
        acc = add_terms(acc, d, jnp.abs(rows_of(w)), fresh, None)
      after = (w, *acc)
    else:
      # Everything from the old rows, written back rounded after every read of
      # them: the sums first (from the unrounded latent weights, as in the
      # reference), then w, then m and v. XLA computes each write in its own
      # loop from the old rows; a write before a read would make it copy the
      # whole array to keep them.
      m32, v32 = moments(rows_of(g).astype(jnp.float32), read(m, dtypes[0]), read(v, dtypes[1]))
      d = jnp.sqrt(v32 * inv_bc2) + eps
      old_w = read(w, dtypes[2])
      w32 = new_latent(old_w, m32, d)
      if names:
        acc = add_terms(acc, d, jnp.abs(w32), fresh, old_w)
      w = put(w, w32 * _one_after(*acc).astype(jnp.float32), dtypes[2])
      order = _one_after(w).astype(jnp.float32)
      m = put(m, m32 * order, dtypes[0])
      v = put(v, v32 * order, dtypes[1])
      after = (m, v)
    # The counter is advanced after every read of the old one: XLA would
    # otherwise keep a copy of it in a temporary. The row index is unsigned:
    # dynamic_slice clamps a signed one, in another temporary.
    i = (i + 1) * _one_after(*after)
    next_start = jnp.minimum(i * block_rows, rows - block_rows).astype(jnp.uint32)
    return i, next_start, m, v, w, acc, i < count

  acc = _initial_acc(names, block_shape, zero)
  init = (zero, zero.astype(jnp.uint32), m, v, w, acc, one > 0)
  _, _, m, v, w, acc, _ = lax.while_loop(lambda carry: carry[-1], body, init)
  m, v, w = (_from_bits(x, dtype).reshape(shape) for x, dtype in zip((m, v, w), dtypes))
  if wide:
    m, v = new_m, new_v
  n = rows if per_channel else rows * cols
  w2, v2 = w.reshape(rows, cols).astype(jnp.float32), v.reshape(rows, cols)

  def max_abs():  # for a rare fallback of a solver (LAQ), under lax.cond
    return jnp.max(jnp.abs(w2), axis=0 if per_channel else None)

  ctx = solver.start(_reduce_acc(acc, names, per_channel) | {"max_abs": max_abs}, n, scale_shape)
  if solver.rounds:
    # Further passes over the leaf (float32 state only, see supports): the
    # solver's rounds, each adding up its terms with the sums before it known.

    def one_pass(ctx):
      names = term_names(ctx, None)

      def body(carry):
        i, start, acc, _ = carry

        def rows_of(x):
          return lax.dynamic_slice_in_dim(x, start, block_rows)

        fresh = (start + lax.broadcasted_iota(jnp.uint32, (block_rows, 1), 0)) >= i * block_rows
        d = jnp.sqrt(rows_of(v2) * inv_bc2_sums) + eps
        terms = solver.terms(ctx, jnp.abs(rows_of(w2)), d, None)
        acc = _accumulate(acc, terms, fresh if overlap else None)
        i = (i + 1) * _one_after(*acc)
        next_start = jnp.minimum(i * block_rows, rows - block_rows).astype(jnp.uint32)
        return i, next_start, acc, i < count

      acc = _initial_acc(names, block_shape, zero)
      init = (zero, zero.astype(jnp.uint32), acc, one > 0)
      _, _, acc, _ = lax.while_loop(lambda carry: carry[-1], body, init)
      return _reduce_acc(acc, names, per_channel) | {"max_abs": max_abs}

    def more(state):
      r, ctx = state
      return (r < solver.rounds) & ~jnp.all(ctx["done"])

    _, ctx = lax.while_loop(
      more, lambda state: (state[0] + 1, solver.step(state[1], one_pass(state[1]), n)), (zero, ctx)
    )
  scale = solver.scale(ctx)
  scale = scale * _one_after(*keep_alive).astype(scale.dtype)
  aux = None if solver.aux is None else solver.aux(ctx)
  return m, v, w.astype(jnp.float32), scale, aux

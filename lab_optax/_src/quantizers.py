r"""Loss-aware ternary and m-bit quantizers: pure functions of ``(w, d)``.

Each solver approximately or exactly solves, for one group of weights (the
whole tensor, or one output channel),

.. math::

  \min_{\alpha \ge 0,\ b} \sum_i d_i (\alpha b_i - w_i)^2

with ``b`` in a fixed normalized level set, and returns ``(codes, scale)``:

* ``codes``: the ``b_i``, with the shape of ``w`` and its dtype promoted to at
  least float32; every value is exactly a level (for ternary: -1, 0 or +1);
* ``scale``: ``alpha``, reduced over ``axis`` with ``keepdims=True`` (as in
  :mod:`lab_optax.projections`), so ``scale * codes`` broadcasts. With
  ``scales=2`` it has a leading axis of 2: ``scale[0]`` is ``alpha+`` (the
  scale of the +1 codes), ``scale[1]`` is ``alpha-`` (the magnitude of the -1
  codes), so one array still holds every scale of a tensor (a single pytree leaf
  to checkpoint or shard) and ``scale.ndim == codes.ndim + 1`` tells the two
  layouts apart. :func:`dequantize` undoes either.

The solvers:

* :func:`ternary_exact`: LATe, the exact ternary minimizer (sort-based);
* :func:`ternary_approximate`: LATa, alternating minimization from a warm start;
* :func:`mbit_approximate`: LAQ, alternating minimization on m-bit linear or
  logarithmic levels (:func:`quantize_levels`);
* :func:`twn` and :func:`absmean`: the TWN and BitNet b1.58 baselines, which
  ignore ``d``.

``d`` is the diagonal curvature (in LAT and LAQ, Adam's ``sqrt(v_hat) + eps``);
``None`` means a constant ``d``. It is broadcast to the shape of ``w``. Where
``d`` sums to zero over a group (``eps = 0`` before any gradient) the objective
does not depend on the answer, and that group is solved with a constant ``d``,
the limit that :func:`lab_optax.projections.lab_scale` uses too.

References:
  Hou and Kwok, `Loss-aware Weight Quantization of Deep Networks
  <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Axis = int | Sequence[int] | None
_LEVELS = ("linear", "log")


def _as_f32(x: jax.typing.ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normalize_axis(axis: Axis, ndim: int, name: str) -> tuple[int, ...]:
  """The reduced axes as a sorted tuple of non-negative ints."""
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < max(ndim, 1) or (ndim == 0 and a not in (0, -1)):
      raise ValueError(f"{name}: axis {a} is out of range for an array of rank {ndim}")
    out.append(a % max(ndim, 1))
  if len(set(out)) != len(out):
    raise ValueError(f"{name}: repeated axis in {axis}")
  return tuple(sorted(out)) if ndim else ()


def _keepdims_shape(shape: tuple[int, ...], red: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(1 if i in red else n for i, n in enumerate(shape))


def _prepare(w, d, axis, name):
  """``w`` and ``d`` in at least float32, ``d`` broadcast, and the reduced axes."""
  w = _as_f32(w)
  red = _normalize_axis(axis, w.ndim, name)
  if d is None:
    d = jnp.ones_like(w)
  else:
    d = jnp.asarray(d).astype(w.dtype)
    try:
      d = jnp.broadcast_to(d, w.shape)
    except ValueError:
      raise ValueError(
        f"{name}: d of shape {d.shape} does not broadcast to w of shape {w.shape}"
      ) from None
    # A group whose d sums to zero has a constant objective: solve it as d = 1.
    d = jnp.where(jnp.sum(d, axis=red, keepdims=True) > 0, d, 1)
  return w, d, red


def _check_scales(scales: int, name: str) -> None:
  if scales not in (1, 2):
    raise ValueError(f"{name}: scales must be 1 or 2, got {scales!r}")


def _check_rounds(rounds: int, name: str) -> None:
  if isinstance(rounds, int) and rounds < 0:
    raise ValueError(f"{name}: rounds must be at least 0, got {rounds}")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0 (no NaN in either branch's gradient)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _sides(w: jax.Array, d: jax.Array, scales: int):
  """Magnitudes and curvatures of the independent sub-problems.

  One scale: ``|w|`` and ``d`` as they are. Two scales: a leading axis of 2,
  the positive weights (others zeroed, with ``d = 0``) then the negative ones.
  """
  a = jnp.abs(w)
  if scales == 1:
    return a, d
  pos, neg = w > 0, w < 0
  zero = jnp.zeros_like(a)
  a2 = jnp.stack([jnp.where(pos, a, zero), jnp.where(neg, a, zero)])
  d2 = jnp.stack([jnp.where(pos, d, zero), jnp.where(neg, d, zero)])
  return a2, d2


def _codes_from_support(w: jax.Array, support: jax.Array, scales: int) -> jax.Array:
  """Ternary codes from a support mask (one scale) or two stacked masks."""
  if scales == 1:
    return jnp.where(support, jnp.sign(w), 0).astype(w.dtype)
  return support[0].astype(w.dtype) - support[1].astype(w.dtype)


def _empty(w: jax.Array, red: tuple[int, ...], scales: int):
  scale = jnp.zeros(_keepdims_shape(w.shape, red), w.dtype)
  if scales == 2:
    scale = jnp.stack([scale, scale])
  return jnp.zeros_like(w), scale


def dequantize(codes: jax.Array, scale: jax.Array) -> jax.Array:
  """The quantized weights ``alpha * codes`` for one or two scales.

  Args:
    codes: codes returned by a solver of this module.
    scale: its scale: keepdims-shaped (one scale), or with a leading axis of 2
      holding ``(alpha+, alpha-)`` (two scales, ``scale.ndim == codes.ndim + 1``).

  Returns:
    ``scale * codes``, or ``where(codes > 0, alpha+, alpha-) * codes``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax._src.quantizers import dequantize
    >>> dequantize(jnp.array([1.0, 0.0, -1.0]), jnp.array([[2.0], [0.5]]))  # (alpha+, alpha-)
    Array([ 2. ,  0. , -0.5], dtype=float32)
  """
  codes, scale = jnp.asarray(codes), jnp.asarray(scale)
  if scale.ndim == codes.ndim + 1:
    if scale.shape[0] != 2:
      raise ValueError(f"dequantize: a two-scale array has a leading axis of 2, got {scale.shape}")
    return jnp.where(codes > 0, scale[0], scale[1]) * codes
  return scale * codes


# ----------------------------------------------------------------------------- LATe


def _ternary_exact_rows(a: jax.Array, d: jax.Array):
  """Exact ternary support and scale of each row of the magnitudes ``a`` (K, N)."""
  k_rows, n = a.shape
  iota = lax.broadcasted_iota(jnp.int32, (k_rows, n), 1)
  # One stable sort of |w| descending, carrying d and the original positions.
  neg_a, d_s, idx = lax.sort((-a, d, iota), dimension=1, is_stable=True, num_keys=1)
  a_s = -neg_a
  s = jnp.cumsum(d_s * a_s, axis=1)  # S_k
  t = jnp.cumsum(d_s, axis=1)  # T_k
  # S_k^2 / T_k is how much keeping the top k lowers sum(d w^2); T_k = 0 lowers nothing.
  gain = _safe_div(s * s, t)
  k = jnp.argmax(gain, axis=1)[:, None]  # the first best k - 1
  s_k = jnp.take_along_axis(s, k, axis=1)
  t_k = jnp.take_along_axis(t, k, axis=1)
  mean_k = jnp.take_along_axis(jnp.cumsum(a_s, axis=1), k, axis=1) / (k + 1).astype(a.dtype)
  # d vanishing on the whole support: any alpha is optimal; use the unweighted mean.
  alpha = jnp.where(t_k > 0, s_k / jnp.where(t_k > 0, t_k, 1), mean_k)[:, 0]
  support = (
    jnp.zeros((k_rows, n), bool)
    .at[jnp.arange(k_rows)[:, None], idx]
    .set((iota <= k) & (a_s > 0), unique_indices=True)  # a zero weight's best code is 0
  )
  return support, alpha


def ternary_exact(
  w: jax.Array, d: jax.Array | None, axis: Axis = None, *, scales: int = 1
) -> tuple[jax.Array, jax.Array]:
  r"""LATe: the exact loss-aware ternary projection.

  Solves, per group of ``axis``,

  .. math::

    \min_{\alpha \ge 0,\ b \in \{-1, 0, 1\}^n} \sum_i d_i (\alpha b_i - w_i)^2.

  For a fixed ``alpha`` the best codes are ``sign(w) 1[|w| > alpha/2]``, so the
  optimal support is the ``k`` largest ``|w|`` for some ``k``. With ``S_k`` and
  ``T_k`` the cumulative sums of ``d|w|`` and ``d`` over ``|w|`` sorted in
  decreasing order, the support of size ``k`` lowers the objective from
  ``sum(d w^2)`` by ``S_k^2 / T_k`` at ``alpha = S_k / T_k``. This takes
  ``k* = argmax S_k^2 / T_k`` over every ``k`` in ``1..n``, ``k = n`` included
  (which the authors' ``findalpha`` misses), and returns the codes of exactly
  that top-``k*`` set. Ties in ``|w|`` are broken by position (the sort is
  stable) and ties in the objective by the smallest ``k``; either way the
  returned ``(codes, scale)`` attain the minimum. The objective is not unimodal
  in ``k``, so no local search from a warm start can replace the full scan.

  With ``scales=2`` (LAT2e) the +1 codes get ``alpha+`` and the -1 codes
  ``alpha-``; the positive and the negative weights are then two independent
  problems of the same form, each solved as above. A side with no weights gets
  scale 0. Guards: ``T_k = 0`` (``d`` vanishing on a support) scores 0, and if
  the chosen support has ``T_k* = 0`` the scale is the unweighted mean of its
  ``|w|``; an all-zero ``w`` gives zero codes and scale 0.

  Cost: one sort of each group (``O(n log n)``), run for all groups at once.

  Args:
    w: full-precision weights (the proximal point ``w_hat_prev - g / d``).
    d: non-negative curvature, broadcastable to ``w``; ``None`` for constant.
    axis: axes to reduce over (``None``: one scale for the whole tensor;
      ``reduction_axes(w.ndim, True)``: one per output channel).
    scales: 1 (LATe) or 2 (LAT2e).

  Returns:
    ``(codes, scale)``: codes in ``{-1, 0, 1}`` with the shape of ``w`` and its
    dtype promoted to at least float32; ``scale`` of the keepdims shape, or of
    shape ``(2, *keepdims)`` holding ``(alpha+, alpha-)`` when ``scales=2``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax._src.quantizers import ternary_exact
    >>> codes, scale = ternary_exact(jnp.array([2.0, -1.5, 0.25, 0.5]), None)
    >>> codes, scale
    (Array([ 1., -1.,  0.,  0.], dtype=float32), Array([1.75], dtype=float32))
    >>> codes, scale = ternary_exact(jnp.array([2.0, -1.5, 0.25, 0.5]), None, scales=2)
    >>> scale.ravel()
    Array([2. , 1.5], dtype=float32)
  """
  _check_scales(scales, "ternary_exact")
  w, d, red = _prepare(w, d, axis, "ternary_exact")
  if w.size == 0:
    return _empty(w, red, scales)
  keep = tuple(i for i in range(w.ndim) if i not in red)
  perm = keep + red
  n_red = int(np.prod([w.shape[i] for i in red], dtype=np.int64))
  a, dd = _sides(w, d, scales)
  lead = a.shape[: a.ndim - w.ndim]  # () or (2,)
  shift = len(lead)
  full_perm = tuple(range(shift)) + tuple(p + shift for p in perm)
  rows = lambda x: jnp.transpose(x, full_perm).reshape(-1, n_red)
  support, alpha = _ternary_exact_rows(rows(a), rows(dd))
  transposed_shape = lead + tuple(w.shape[i] for i in perm)
  support = jnp.transpose(support.reshape(transposed_shape), np.argsort(full_perm))
  scale = alpha.reshape(lead + _keepdims_shape(w.shape, red))
  return _codes_from_support(w, support, scales), scale


# ----------------------------------------------------------------------------- LATa


def _lat_terms(s: jax.Array, a: jax.Array, d: jax.Array) -> tuple[jax.Array, ...]:
  """The terms of :func:`_lat_alpha`'s sums: ``|b| d |w|``, ``|b| d``, ``|b|``, ``|b| |w|``.

  Shared with the blocked CPU update (``fused.py``), which adds them up by row blocks.
  """
  sf = s.astype(a.dtype)
  return sf * d * a, sf * d, sf, sf * a


def _lat_alpha_from_sums(num, den, cnt, plain_num) -> jax.Array:
  """``num / den``; the unweighted mean ``plain_num / cnt`` if ``den = 0``; 0 if ``cnt = 0``."""
  plain = _safe_div(plain_num, cnt)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), plain)


def _lat_alpha(s: jax.Array, a: jax.Array, d: jax.Array, red: tuple[int, ...]) -> jax.Array:
  """``sum(|b| d |w|) / sum(|b| d)``; unweighted if ``d`` vanishes on the support; 0 if empty."""
  return _lat_alpha_from_sums(*(jnp.sum(t, axis=red, keepdims=True) for t in _lat_terms(s, a, d)))


def _alternate_round(alpha, done, new_alpha, tol):
  """One round of :func:`_alternate` for the scales: groups not yet done move to ``new_alpha``.

  Returns ``(alpha, done, moving)``, ``moving`` where the round's values are taken.
  """
  converged = jnp.abs(new_alpha - alpha) < tol
  return jnp.where(done, alpha, new_alpha), done | converged, ~done


def _alternate(step, codes0, alpha0, rounds, tol):
  """Iterate ``(codes, alpha) <- step(alpha)`` per group until alpha moves by < tol.

  Each group (entry of ``alpha``) freezes at the round where it converged; the
  loop ends after ``rounds`` rounds or once every group has converged.
  """

  def cond(state):
    i, _, _, done = state
    return (i < rounds) & ~jnp.all(done)

  def body(state):
    i, codes, alpha, done = state
    new_codes, new_alpha = step(alpha)
    alpha, done, moving = _alternate_round(alpha, done, new_alpha, tol)
    codes = jnp.where(moving, new_codes, codes)
    return i + 1, codes, alpha, done

  done0 = jnp.zeros(alpha0.shape, bool)
  _, codes, alpha, _ = lax.while_loop(cond, body, (jnp.int32(0), codes0, alpha0, done0))
  return codes, alpha


def ternary_approximate(
  w: jax.Array,
  d: jax.Array | None,
  axis: Axis = None,
  codes: jax.Array | None = None,
  rounds: int = 10,
  tol: float = 1e-6,
  *,
  scales: int = 1,
) -> tuple[jax.Array, jax.Array]:
  r"""LATa: the approximate loss-aware ternary projection (alternating minimization).

  Starts from the support of ``codes`` (the previous step's codes: which
  weights were nonzero; the signs are taken from ``w``), or from every nonzero
  weight (``b = sign(w)``) when ``codes`` is ``None``, with
  ``alpha = sum(|b| d |w|) / sum(|b| d)``, then alternates

  * ``b = sign(w) 1[|w| > alpha / 2]``;
  * ``alpha = sum(|b| d |w|) / sum(|b| d)``,

  for at most ``rounds`` rounds; a group (one tensor, or one channel) stops at
  the first round where its ``alpha`` moves by less than ``tol`` (absolute) and
  keeps that round's ``(b, alpha)``, so at the returned point ``alpha`` is
  exactly the formula of the codes, and the codes are the threshold rule of an
  alpha less than ``tol`` away (of ``alpha`` itself with ``tol=0`` once the
  codes stop changing). A local method: it can stop at a worse fixed point than
  :func:`ternary_exact`'s (e.g. ``w = [10, 1 x 100]`` from ``b = [1, 0 x 100]``).

  Empty support (``sum(|b|) = 0``): ``alpha = 0``, so the next round restarts
  from ``b = sign(w)`` (the cold start); an all-zero ``w`` (or side) stays at
  zero codes and scale 0. A support on which ``d`` vanishes gets the
  unweighted mean of its ``|w|`` (the objective does not depend on it).

  With ``scales=2`` (LAT2a) the positive and negative weights are two
  independent problems with scales ``alpha+`` and ``alpha-``; each side (of
  each group) stops on its own.

  Args:
    w: full-precision weights.
    d: non-negative curvature, broadcastable to ``w``; ``None`` for constant.
    axis: axes to reduce over (``None``: the whole tensor).
    codes: warm start, e.g. the previous step's codes (only ``codes != 0`` is
      used); ``None``: ``sign(w)``.
    rounds: maximum number of rounds; the authors use 10. 0 keeps the start's
      alpha (that of the warm start's support) and codes.
    tol: absolute tolerance on the change of ``alpha``.
    scales: 1 (LATa) or 2 (LAT2a).

  Returns:
    ``(codes, scale)`` as for :func:`ternary_exact`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax._src.quantizers import ternary_approximate
    >>> w = jnp.array([2.0, -1.5, 0.25, 0.5])
    >>> ternary_approximate(w, None)
    (Array([ 1., -1.,  0.,  0.], dtype=float32), Array([1.75], dtype=float32))
  """
  _check_scales(scales, "ternary_approximate")
  _check_rounds(rounds, "ternary_approximate")
  w, d, red = _prepare(w, d, axis, "ternary_approximate")
  if w.size == 0:
    return _empty(w, red, scales)
  a, dd = _sides(w, d, scales)
  red_a = tuple(r + a.ndim - w.ndim for r in red)
  if codes is None:
    start = a > 0
  else:
    start = jnp.broadcast_to(jnp.asarray(codes) != 0, w.shape)
    if scales == 2:
      start = start & (a > 0)  # each side starts from the warm support on its own weights

  def step(alpha):
    support = a > alpha / 2
    return support, _lat_alpha(support, a, dd, red_a)

  support, alpha = _alternate(step, start, _lat_alpha(start, a, dd, red_a), rounds, tol)
  return _codes_from_support(w, support, scales), alpha


# ----------------------------------------------------------------------------- LAQ


def quantize_levels(bits: int, levels: str = "linear") -> np.ndarray:
  """The normalized m-bit level set, symmetric and sorted.

  With ``n = 2^(bits-1) - 1`` positive levels:

  * ``"linear"``: ``{0, +-1/n, +-2/n, ..., +-1}``;
  * ``"log"``: ``{0, +-2^-(n-1), ..., +-1/2, +-1}``.

  For 2 bits both are ternary, ``{-1, 0, 1}``.

  Args:
    bits: from 2 to 8.
    levels: ``"linear"`` or ``"log"``.

  Returns:
    A float64 NumPy array of the ``2n + 1`` levels in increasing order.

  Raises:
    ValueError: for ``bits`` outside 2..8 or an unknown ``levels``.

  Examples:
    >>> from lab_optax._src.quantizers import quantize_levels
    >>> quantize_levels(3, "linear") * 3
    array([-3., -2., -1.,  0.,  1.,  2.,  3.])
    >>> quantize_levels(3, "log")
    array([-1.  , -0.5 , -0.25,  0.  ,  0.25,  0.5 ,  1.  ])
  """
  if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
    raise ValueError(f"quantize_levels: bits must be an integer from 2 to 8, got {bits!r}")
  if levels not in _LEVELS:
    raise ValueError(f"quantize_levels: levels must be one of {_LEVELS}, got {levels!r}")
  n = 2 ** (int(bits) - 1) - 1
  if levels == "linear":
    positive = np.arange(1, n + 1, dtype=np.float64) / n
  else:
    positive = 2.0 ** np.arange(-(n - 1), 1, dtype=np.float64)
  return np.concatenate([-positive[::-1], [0.0], positive])


def mbit_approximate(
  w: jax.Array,
  d: jax.Array | None,
  axis: Axis = None,
  *,
  bits: int = 3,
  levels: str = "linear",
  codes: jax.Array | None = None,
  rounds: int = 10,
  tol: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
  r"""LAQ: the approximate loss-aware m-bit projection (alternating minimization).

  Minimizes ``sum(d (alpha b - w)^2)`` over ``alpha >= 0`` and ``b`` in
  :func:`quantize_levels` ``(bits, levels)`` by alternating

  * ``b = nearest level of clip(w / alpha, -1, 1)`` (the best codes for that
    ``alpha``); a value exactly halfway between two levels (midpoints computed
    in float64, then rounded to the compute dtype) goes to the level of smaller
    magnitude, as in the ternary rule ``|w| > alpha/2``;
  * ``alpha = sum(d b w) / sum(d b^2)``, the weighted least squares (the best
    ``alpha`` for those codes),

  for at most ``rounds`` rounds, each group stopping at the first round where
  ``alpha`` moves by less than ``tol`` (absolute), with that round's
  ``(b, alpha)``. The start is ``alpha`` = the least squares of ``codes``
  (only ``|codes|`` is used: the signs come from ``w``) when they are given,
  else ``alpha = max|w|``, which maps the largest weight to the level 1.

  The authors' code (Theano, 3 bits only) takes the alpha step
  ``sum(|b| d |w|) / sum(|b| d)``, which equals the least squares only for
  ternary codes; with more levels it is not the best ``alpha`` for the codes
  and gives a visibly higher objective. This function uses the least squares.

  Guards: a support on which ``d`` vanishes gets the unweighted least squares;
  an empty support (all codes 0) restarts from ``alpha = max|w|``; an all-zero
  ``w`` gives zero codes and scale 0.

  Args:
    w: full-precision weights.
    d: non-negative curvature, broadcastable to ``w``; ``None`` for constant.
    axis: axes to reduce over (``None``: the whole tensor).
    bits: from 2 to 8 (2 bits is ternary; log levels from 5 bits reach
      ``2^-14`` and below, awkward in low precision).
    levels: ``"linear"`` or ``"log"``.
    codes: warm start, e.g. the previous step's codes; ``None``: cold start.
    rounds: maximum number of rounds; the authors use 10. 0 keeps the start's
      alpha (that of the warm start's support) and codes.
    tol: absolute tolerance on the change of ``alpha``.

  Returns:
    ``(codes, scale)``: codes exactly on the level set (in the dtype of ``w``
    promoted to at least float32) and ``scale`` of the keepdims shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax._src.quantizers import mbit_approximate
    >>> codes, scale = mbit_approximate(jnp.array([0.9, -0.3, 0.6, 0.0]), None)
    >>> codes * 3, scale.round(6)
    (Array([ 3., -1.,  2.,  0.], dtype=float32), Array([0.9], dtype=float32))
  """
  _check_rounds(rounds, "mbit_approximate")
  table = quantize_levels(bits, levels)
  w, d, red = _prepare(w, d, axis, "mbit_approximate")
  if w.size == 0:
    return _empty(w, red, 1)
  a = jnp.abs(w)
  sign = jnp.sign(w)
  max_abs = jnp.max(a, axis=red, keepdims=True)
  magnitude = _mbit_magnitude(table, w.dtype)

  def alpha_of(m):  # m = |b|
    sums = (jnp.sum(t, axis=red, keepdims=True) for t in _mbit_terms(m, a, d))
    return _mbit_alpha_from_sums(*sums, max_abs)

  def step(alpha):
    m = magnitude(a, alpha)
    return m, alpha_of(m)

  if codes is None:
    m0, alpha0 = jnp.zeros_like(a), max_abs
  else:
    m0 = jnp.broadcast_to(jnp.abs(jnp.asarray(codes)).astype(w.dtype), w.shape)
    alpha0 = alpha_of(m0)
  m, alpha = _alternate(step, m0, alpha0, rounds, tol)
  return jnp.where(m > 0, sign * m, 0).astype(w.dtype), alpha


def _mbit_magnitude(table: np.ndarray, dtype):
  """``(|w|, alpha) -> |b|``: the nearest level of ``clip(|w| / alpha, 0, 1)``, ties toward 0.

  Shared with the blocked CPU update (``fused.py``). Up to 8 positive levels it
  is a chain of selects (no gather), which XLA:CPU vectorizes.
  """
  positive = table[table >= 0]  # 0 first, then increasing
  pos_levels = jnp.asarray(positive, dtype)
  midpoints = jnp.asarray((positive[1:] + positive[:-1]) / 2, dtype)

  def magnitude(a, alpha):
    x = jnp.clip(_safe_div(a, alpha), 0, 1)
    if len(positive) > 8:
      return pos_levels[jnp.searchsorted(midpoints, x, side="left")]
    m = jnp.zeros_like(x)
    for j in range(len(positive) - 1):  # x above the midpoint: the next level (a tie stays)
      m = jnp.where(x > midpoints[j], pos_levels[j + 1], m)
    return m

  return magnitude


def _mbit_terms(m: jax.Array, a: jax.Array, d: jax.Array) -> tuple[jax.Array, ...]:
  """The terms of LAQ's least squares: ``d |b| |w|``, ``d b^2``, ``|b| |w|``, ``b^2``."""
  return d * m * a, d * m * m, m * a, m * m


def _mbit_alpha_from_sums(num, den, plain_num, plain_den, max_abs) -> jax.Array:
  """The weighted least squares ``num / den``; unweighted if ``d`` vanishes; ``max|w|`` if 0."""
  plain = jnp.where(plain_num > 0, _safe_div(plain_num, plain_den), 0)
  alpha = jnp.where(num > 0, _safe_div(num, den), plain)
  return jnp.where(alpha > 0, alpha, max_abs)


# ----------------------------------------------------------------------------- baselines


def twn(w: jax.Array, axis: Axis = None) -> tuple[jax.Array, jax.Array]:
  """Ternary Weight Networks (Li and Liu, 2016): a threshold rule that ignores curvature.

  ``Delta = 0.7 mean|w|``, ``b = sign(w) 1[|w| > Delta]``,
  ``alpha = mean(|w| over |w| > Delta)`` (0 when no weight exceeds ``Delta``,
  i.e. for an all-zero group). An approximation of the L2-optimal ternary
  projection, which :func:`ternary_exact` with ``d=None`` computes exactly.

  Args:
    w: full-precision weights.
    axis: axes to reduce over (``None``: the whole tensor).

  Returns:
    ``(codes, scale)`` as for :func:`ternary_exact` with one scale.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax._src.quantizers import twn
    >>> twn(jnp.array([2.0, -1.5, 0.25, 0.5]))
    (Array([ 1., -1.,  0.,  0.], dtype=float32), Array([1.75], dtype=float32))
  """
  w = _as_f32(w)
  red = _normalize_axis(axis, w.ndim, "twn")
  if w.size == 0:
    return _empty(w, red, 1)
  a = jnp.abs(w)
  delta = _twn_delta(jnp.sum(a, axis=red, keepdims=True), _count(w, red))
  keep, a_kept = _twn_terms(a, delta)
  scale = _safe_div(
    jnp.sum(a_kept, axis=red, keepdims=True), jnp.sum(keep, axis=red, keepdims=True)
  )
  return _twn_codes(w, delta), scale


def _twn_delta(sum_abs: jax.Array, n: int) -> jax.Array:
  """TWN's threshold ``0.7 mean|w|`` from ``sum|w|`` over ``n`` weights."""
  return 0.7 * (sum_abs / n)


def _twn_terms(a: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The terms of TWN's scale: ``1[|w| > Delta]`` and ``|w| 1[|w| > Delta]``."""
  keep = a > delta
  return keep.astype(a.dtype), jnp.where(keep, a, 0)


def _twn_codes(w: jax.Array, delta: jax.Array) -> jax.Array:
  """TWN's codes ``sign(w) 1[|w| > Delta]``."""
  return jnp.where(jnp.abs(w) > delta, jnp.sign(w), 0).astype(w.dtype)


def absmean(w: jax.Array, axis: Axis = None, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """BitNet b1.58's absmean ternary quantizer (Ma et al., 2024, eqs. 9-11).

  ``gamma = mean|w|``, ``b = clip(round(w / (gamma + eps)), -1, 1)`` (round half
  to even, like ``torch.round``), scale ``gamma``: a threshold of about
  ``gamma / 2`` with the scale ``gamma``, which is not the L2-optimal scale of
  those codes. ``eps`` follows the paper's ``gamma + eps``; BitNet's released
  training code instead divides by ``clamp(gamma, min=1e-5)`` (and rescales by
  that), which differs only for ``gamma < 1e-5``.

  Args:
    w: full-precision weights.
    axis: axes to reduce over (``None``: one ``gamma`` per tensor, as in the
      paper).
    eps: added to ``gamma`` before dividing.

  Returns:
    ``(codes, scale)``: codes in ``{-1, 0, 1}`` and ``scale = gamma`` of the
    keepdims shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax._src.quantizers import absmean
    >>> absmean(jnp.array([2.0, -1.5, 0.25, 0.75]))  # 0.75 / 1.125 rounds to 1
    (Array([ 1., -1.,  0.,  1.], dtype=float32), Array([1.125], dtype=float32))
  """
  w = _as_f32(w)
  red = _normalize_axis(axis, w.ndim, "absmean")
  if w.size == 0:
    return _empty(w, red, 1)
  gamma = _absmean_gamma(jnp.sum(jnp.abs(w), axis=red, keepdims=True), _count(w, red))
  return _absmean_codes(w, gamma, eps), gamma


def _count(w: jax.Array, red: tuple[int, ...]) -> int:
  """Weights per group."""
  return int(np.prod([w.shape[i] for i in red], dtype=np.int64))


def _absmean_gamma(sum_abs: jax.Array, n: int) -> jax.Array:
  """``gamma = mean|w|`` from ``sum|w|`` over ``n`` weights."""
  return sum_abs / n


def _absmean_codes(w: jax.Array, gamma: jax.Array, eps: float) -> jax.Array:
  """BitNet b1.58's codes ``clip(round(w / (gamma + eps)), -1, 1)``."""
  return jnp.clip(jnp.round(w / (gamma + eps)), -1, 1)

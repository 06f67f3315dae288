"""Closed-form projections onto the binary set: pure functions of ``(w, d)``.

Each ``*_scale`` function returns the scale ``alpha`` of the binarized tensor
``alpha * binary_sign(w)``. They differ only in how ``alpha`` is chosen:

* :func:`lab_scale`: the proximal Newton step of LAB (Theorem 3.1 of Hou et al.,
  2017), ``alpha = ||d * w||_1 / ||d||_1``;
* :func:`bwn_scale`: Binary Weight Networks, ``alpha = mean(|w|)``;
* :func:`binary_connect_scale`: BinaryConnect, ``alpha = 1``.

``alpha`` is reduced over ``axis`` with ``keepdims=True``, so
``alpha * binary_sign(w)`` broadcasts. ``axis=None`` gives one alpha per tensor
(the paper's choice); :func:`reduction_axes` gives one per output channel.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lab_optax._src import quantizers

Axis = int | Sequence[int] | None
ScaleFn = Callable[[jax.Array, jax.Array | None, Axis], jax.Array]


def binary_sign(x: jax.typing.ArrayLike) -> jax.Array:
  """Sign with ``binary_sign(0) = +1``, so a number always maps to -1 or +1.

  NaN maps to NaN, so a diverged latent weight shows in the params (for every
  method, BinaryConnect's ``alpha = 1`` included) instead of becoming a finite
  ``-1``.

  Args:
    x: an array.

  Returns:
    ``+1`` where ``x >= 0`` (``-0.0`` included), ``-1`` where ``x < 0`` and NaN
    where ``x`` is NaN, with the dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import binary_sign
    >>> binary_sign(jnp.array([-2.0, 0.0, 3.0, jnp.nan]))
    Array([-1.,  1.,  1., nan], dtype=float32)
  """
  x = jnp.asarray(x)
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0, one, jnp.where(x < 0, -one, x))


def reduction_axes(ndim: int, per_channel: bool) -> tuple[int, ...] | None:
  """Axes over which one alpha is computed.

  Args:
    ndim: rank of the weight tensor.
    per_channel: if ``True``, one alpha per slice along the last axis (the
      output channels of a Flax ``Dense`` or ``Conv`` kernel); otherwise one
      alpha for the whole tensor.

  Returns:
    ``None`` (reduce everything) or the tuple of all axes but the last.
  """
  if not per_channel or ndim == 0:
    return None
  return tuple(range(ndim - 1))


def _as_f32(x: jax.typing.ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _keepdims_zeros(w: jax.Array, axis: Axis) -> jax.Array:
  return jnp.zeros_like(jnp.sum(w, axis=axis, keepdims=True))


def bwn_scale(w: jax.Array, d: jax.Array | None = None, axis: Axis = None) -> jax.Array:
  """BWN scale ``alpha = mean(|w|)`` (``d`` is ignored).

  Args:
    w: full-precision weights.
    d: unused; present so that every scale function has the same signature.
    axis: axes to reduce over (``None``: the whole tensor).

  Returns:
    ``alpha`` in at least float32, reduced with ``keepdims=True``. An empty
    tensor gives ``alpha = 0``.
  """
  del d
  w = _as_f32(w)
  if w.size == 0:
    return _keepdims_zeros(w, axis)
  return jnp.mean(jnp.abs(w), axis=axis, keepdims=True)


def binary_connect_scale(w: jax.Array, d: jax.Array | None = None, axis: Axis = None) -> jax.Array:
  """BinaryConnect scale ``alpha = 1`` (``d`` is ignored).

  Args:
    w: full-precision weights.
    d: unused.
    axis: axes to reduce over (``None``: the whole tensor).

  Returns:
    Ones in at least float32, shaped as ``alpha`` of the other scale functions.
  """
  del d
  return _keepdims_zeros(_as_f32(w), axis) + 1


def lab_scale(w: jax.Array, d: jax.Array | None, axis: Axis = None) -> jax.Array:
  r"""LAB scale: the minimizer over ``alpha`` of Theorem 3.1.

  .. math::

    \alpha = \frac{\|d \odot w\|_1}{\|d\|_1}

  where ``d > 0`` is the diagonal of the Hessian approximation (in LAB,
  ``sqrt(v_hat) + eps`` from Adam). Where ``sum(d) == 0`` (``eps = 0`` and no
  gradient yet) this falls back to ``mean(|w|)``, the limit of a constant ``d``.

  Args:
    w: full-precision weights, ``w = w_hat_prev - g / d``.
    d: positive weights of the same shape as ``w``. ``None`` means a constant
      ``d``, which gives BWN's ``mean(|w|)``.
    axis: axes to reduce over (``None``: the whole tensor).

  Returns:
    ``alpha`` in at least float32, reduced with ``keepdims=True``.
  """
  if d is None:
    return bwn_scale(w, axis=axis)
  w, d = _as_f32(w), _as_f32(d)
  if d.shape != w.shape:
    # A broadcast d (a scalar, a row) is a constant along the broadcast axes; it
    # must be summed over w's shape, not its own.
    try:
      d = jnp.broadcast_to(d, w.shape)
    except ValueError:
      raise ValueError(
        f"lab_scale: d of shape {d.shape} does not broadcast to w of shape {w.shape}"
      ) from None
  if w.size == 0:
    return _keepdims_zeros(w, axis)
  sum_d = jnp.sum(d, axis=axis, keepdims=True)
  weighted = jnp.sum(d * jnp.abs(w), axis=axis, keepdims=True)
  positive = sum_d > 0
  alpha = weighted / jnp.where(positive, sum_d, 1)
  return jnp.where(positive, alpha, jnp.mean(jnp.abs(w), axis=axis, keepdims=True))


def proximal_binarize(w: Any, d: Any, *, per_channel: bool = False) -> Any:
  r"""Closed-form proximal Newton step onto the binary set (Theorem 3.1).

  For each weight tensor, solves

  .. math::

    \min_{\alpha > 0,\ b \in \{\pm 1\}^n}
      \sum_i d_i (\alpha b_i - w_i)^2

  whose solution is ``b = binary_sign(w)`` and
  ``alpha = ||d * w||_1 / ||d||_1``. Works on one array or on matching pytrees
  of arrays, and under :func:`jax.jit`.

  Args:
    w: an array or a pytree of arrays: the point ``w_hat_prev - g / d``.
    d: positive curvature, an array or pytree with the structure of ``w``.
    per_channel: one alpha per slice along the last axis instead of one per
      tensor.

  Returns:
    ``alpha * binary_sign(w)`` with the structure and dtypes of ``w``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import proximal_binarize
    >>> w = jnp.array([[0.5, -1.0], [0.0, 2.0]])
    >>> proximal_binarize(w, jnp.ones_like(w))  # constant d: alpha = mean|w|
    Array([[ 0.875, -0.875],
           [ 0.875,  0.875]], dtype=float32)

  References:
    Hou, Yao and Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
  """

  def one(path, w, d):
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(
        f"proximal_binarize: the leaf at {jax.tree_util.keystr(path) or '<root>'} has dtype "
        f"{w.dtype}; binarized weights must be floating"
      )
    try:
      alpha = lab_scale(w, d, reduction_axes(w.ndim, per_channel))
    except ValueError as e:
      raise ValueError(f"{e} (leaf at {jax.tree_util.keystr(path) or '<root>'})") from None
    return (alpha * binary_sign(w)).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, w, d)


class BlockedSolver(NamedTuple):
  """How the blocked CPU update (``fused.py``) computes a projection's scale from sums.

  The update adds ``terms`` up over the leaf (one scale per tensor, or per output
  channel) block by block: first in the loop that updates the latent weights,
  then in up to ``rounds`` more passes over the leaf, each with the context that
  the sums before it gave. The formulas are the projection's own (the
  functions its reference solver calls), so the two paths agree up to the
  order of the additions.

  Attributes:
    terms: ``(ctx, abs_w, d, warm) -> dict`` of elementwise terms, float32
      arrays of the shape of ``abs_w``; ``ctx`` is ``None`` in the update loop,
      ``warm`` the previous step's codes there (``None`` unless ``warm``) and
      ``None`` in the passes after it. Each is summed over the leaf (per scale).
    start: ``(sums, n, shape) -> ctx`` after the update loop, ``n`` weights per
      scale, ``shape`` the flat shape of the scale (``()`` or ``(out,)``).
      ``sums["max_abs"]`` is a function of no arguments that gives ``max|w|``
      per scale by another pass over the leaf (for a rare fallback, under
      ``lax.cond``).
    step: ``(ctx, sums, n) -> ctx`` after each further pass.
    scale: ``ctx -> scale``, of the flat shape (``()`` or ``(out,)``).
    rounds: further passes, at most; they end once ``ctx["done"]`` holds everywhere.
    warm: whether ``terms`` needs the previous step's codes.
    aux: ``ctx -> array`` for :meth:`Projection.codes_from`, or ``None``: the
      codes then follow from the rounded scale (:meth:`Projection.codes`).
  """

  terms: Callable[..., dict[str, jax.Array]]
  start: Callable[..., dict[str, jax.Array]]
  step: Callable[..., dict[str, jax.Array]] | None = None
  scale: Callable[[dict[str, jax.Array]], jax.Array] = lambda ctx: ctx["scale"]
  rounds: int = 0
  warm: bool = False
  aux: Callable[[dict[str, jax.Array]], jax.Array] | None = None


class Projection:
  r"""A projection onto a quantized set: ``(w, d, axis) -> (codes, scale)``.

  The one protocol every quantizing method of lab_optax follows, and the one a
  user implements for a method of their own. It solves (exactly or
  approximately)

  .. math::

    \min_{\text{scale},\ b \in L^n} \sum_i d_i (\text{scale} \cdot b_i - w_i)^2

  where :math:`L` is the normalized level set :attr:`levels`, and knows how to
  turn codes and scales back into weights. Subclasses define :attr:`levels`
  and :meth:`__call__`; :meth:`initial` (the first projection, ``t = 1``),
  :meth:`codes`, :meth:`dequantize` and :attr:`num_scales` have defaults.

  Scales are reduced over ``axis`` with ``keepdims=True`` (``axis=None``: one
  per tensor; all axes but the last: one per output channel). A projection
  with two scales (one for the positive codes, one for the negative ones)
  stacks them on a new leading axis of size 2.
  """

  #: The normalized level set, sorted: ``(-1.0, 1.0)`` for binary weights.
  levels: tuple[float, ...] = ()
  #: Scales per tensor (or per channel): 1, or 2 for separate positive and negative scales.
  num_scales: int = 1
  #: Every quantized value is an integer multiple of ``scale / divisor`` (1 for
  #: binary and ternary levels, ``n`` for linear m-bit levels). The optimizer
  #: rounds ``scale / divisor`` so that ``optax.apply_updates`` lands exactly.
  divisor: int = 1

  def __call__(
    self, w: jax.Array, d: jax.Array | None, axis: Axis = None, codes: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Codes and scales of ``w`` under the curvature ``d``.

    Args:
      w: full-precision weights (at least float32 inside the optimizer).
      d: positive curvature of ``w``'s shape, or ``None`` for a constant one.
      axis: the axes each scale is reduced over (``None``: the whole tensor).
      codes: the previous step's codes, for solvers that start from them
        (``None``: no previous step).

    Returns:
      ``(codes, scale)``: codes of ``w``'s shape with values in
      :attr:`levels`, and the scales, reduced over ``axis`` with keepdims.
    """
    raise NotImplementedError

  def initial(self, w: jax.Array, axis: Axis = None) -> tuple[jax.Array, jax.Array]:
    """The first projection (``t = 1``, before any gradient): ``self(w, None, axis)``."""
    return self(w, None, axis)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # A projection is static data: the optimizer state holds it as a pytree
    # node without leaves, so that quantize_params can rebuild the params.
    jax.tree_util.register_static(cls)

  #: Whether :meth:`__call__` starts from the previous step's codes (the
  #: optimizer then passes them, recovered from the params with :meth:`codes`).
  warm_start: bool = False

  def codes(self, w: jax.Array, scale: jax.Array, axis: Axis = None) -> jax.Array:
    """The codes this method gives ``w`` at ``scale``: the nearest level of ``w / scale``.

    The optimizer calls it after rounding the scale (so that
    ``optax.apply_updates`` lands exactly on the level set), and
    :func:`lab_optax.quantize_params` calls it to rebuild the params from the
    latent weights and scales of a restored state. Override it where the
    method's codes do not follow from the scale alone.
    """
    del axis
    # Ties go to the level nearer zero, then to the positive one: the ternary
    # threshold rule keeps |w| = scale / 2 at 0, and sign(0) = +1.
    order = sorted(self.levels, key=lambda level: (abs(level), -level))
    dtype = jnp.result_type(w)
    s = self._by_sign(scale, w >= 0)
    x = jnp.where(s > 0, w / jnp.where(s > 0, s, 1), 0)
    positive = [level for level in order if level > 0]
    if (
      order[0] == 0
      and len(positive) <= 16
      and sorted(-level for level in positive) == sorted(level for level in order if level < 0)
    ):
      # Symmetric levels with 0 (ternary, m-bit): the argmin below as a running
      # minimum over the magnitudes, in the same order and with the same
      # distances, which XLA:CPU computes in one elementwise loop (the argmin
      # and the lookup in the table keep index arrays the size of w). A
      # negative level never wins a tie with the positive one (it comes after
      # it) nor beats it: so the sign of x, times the nearest magnitude.
      ax = jnp.abs(x)
      m = jnp.zeros_like(x)
      best = ax
      for level in positive:
        dist = jnp.abs(ax - jnp.asarray(level, dtype))
        m = jnp.where(dist < best, jnp.asarray(level, dtype), m)
        best = jnp.minimum(dist, best)
      return jnp.where(jnp.isnan(w), w, jnp.where((x < 0) & (m > 0), -m, m))
    levels = jnp.asarray(order, dtype)
    nearest = jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1)
    return jnp.where(jnp.isnan(w), w, levels[nearest])

  def dequantize(self, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """The weights ``scale * codes`` (with two scales: by the sign of each code)."""
    return codes * self._by_sign(scale, codes > 0)

  def _by_sign(self, scale: jax.Array, positive: jax.Array) -> jax.Array:
    if self.num_scales == 1:
      return scale
    return jnp.where(positive, scale[0], scale[1])

  def aux(self, w: jax.Array, axis: Axis = None) -> jax.Array | None:
    """What :meth:`codes_from` needs besides ``w`` (``None``: the codes follow from the scale)."""
    del w, axis
    return None

  def codes_from(self, w: jax.Array, aux: jax.Array) -> jax.Array:
    """The codes of ``w`` from :meth:`aux` (for methods whose codes do not follow from the scale)."""
    raise NotImplementedError

  def blocked_solver(self, guard_zero_d: bool) -> BlockedSolver | None:
    """How the blocked CPU update computes the scale, or ``None``: the reference update.

    Args:
      guard_zero_d: ``d`` may be zero (``eps`` is zero or traced).
    """
    del guard_zero_d
    return None


class BinaryProjection(Projection):
  """Binary weights ``alpha * binary_sign(w)``, with ``alpha`` from a scale function.

  LAB, BWN and BinaryConnect are this projection with :func:`lab_scale`,
  :func:`bwn_scale` and :func:`binary_connect_scale`.

  Args:
    scale_fn: ``(w, d, axis) -> alpha``, reduced over ``axis`` with keepdims.
    initial_scale_fn: the scale of the first projection (``t = 1``, constant
      ``d``); ``None`` uses ``scale_fn`` with ``d = None``.
  """

  levels = (-1.0, 1.0)

  def __init__(self, scale_fn: ScaleFn, initial_scale_fn: ScaleFn | None = None):
    self.scale_fn = scale_fn
    self.initial_scale_fn = scale_fn if initial_scale_fn is None else initial_scale_fn

  def __call__(self, w, d, axis=None, codes=None):
    del codes
    return binary_sign(w), self.scale_fn(w, d, axis)

  def initial(self, w, axis=None):
    return binary_sign(w), self.initial_scale_fn(w, None, axis)

  def codes(self, w, scale, axis=None):
    del scale, axis
    return binary_sign(w)

  # The blocked CPU update (lab_optax/_src/fused.py) adds the scale's sums up
  # block by block (blocked_solver): which sums each built-in scale needs, and
  # the scale from them.
  def blocked_sums(self, guard_zero_d: bool) -> tuple[str, ...] | None:
    """The sums over the leaf that the scale needs (``"d"``, ``"dw"``: ``d * |w|``,
    ``"w"``: ``|w|``), or ``None`` when the blocked update cannot compute it."""
    if self.scale_fn is lab_scale:
      # Without eps, sum(d) can be zero and alpha falls back to mean(|w|), as in lab_scale.
      return ("d", "dw", "w") if guard_zero_d else ("d", "dw")
    return {bwn_scale: ("w",), binary_connect_scale: ()}.get(self.scale_fn)

  def scale_from_sums(self, sums: dict[str, jax.Array], n: int, shape: tuple[int, ...]):
    """The scale from the sums of :meth:`blocked_sums` over ``n`` weights per scale."""
    if self.scale_fn is binary_connect_scale:
      return jnp.ones(shape, jnp.float32)
    if self.scale_fn is bwn_scale:
      return sums["w"] / n
    positive = sums["d"] > 0
    alpha = sums["dw"] / jnp.where(positive, sums["d"], 1)
    return jnp.where(positive, alpha, sums["w"] / n) if "w" in sums else alpha

  def blocked_solver(self, guard_zero_d):
    names = self.blocked_sums(guard_zero_d)
    if names is None:
      return None

    def terms(ctx, abs_w, d, warm):
      del ctx, warm
      every = {"d": lambda: d, "dw": lambda: d * abs_w, "w": lambda: abs_w}
      return {name: every[name]() for name in names}

    def start(sums, n, shape):
      return {"scale": self.scale_from_sums(sums, n, shape)}

    return BlockedSolver(terms, start)

  def __eq__(self, other):
    return type(other) is type(self) and (other.scale_fn, other.initial_scale_fn) == (
      self.scale_fn,
      self.initial_scale_fn,
    )

  def __hash__(self):
    return hash((type(self), self.scale_fn, self.initial_scale_fn))

  def __repr__(self):
    return f"BinaryProjection({self.scale_fn.__name__})"


#: LAB's projection: ``alpha = ||d w||_1 / ||d||_1``; the first one uses ``mean|w|``.
lab = BinaryProjection(lab_scale, bwn_scale)
#: BWN's projection: ``alpha = mean|w|``.
bwn = BinaryProjection(bwn_scale)
#: BinaryConnect's projection: ``alpha = 1``.
binary_connect = BinaryProjection(binary_connect_scale)


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if isinstance(value, bool) or value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _alternating_solver(alpha, codes, terms, rounds, tol) -> BlockedSolver:
  """The blocked form of an alternation of scale and codes (LATa, LAQ).

  The first pass sums the terms of the previous codes (the warm start); each
  round then sums those of the codes of the current scale, until ``rounds`` or
  the scale moves by less than ``tol``.

  Args:
    alpha: ``sums -> alpha``, the least-squares scale of the summed terms.
    codes: ``(|w|, alpha) -> |b|``, the codes' magnitudes for a scale.
    terms: ``(|b|, |w|, d) -> (num, den, ...)``, the terms of the scale's sums.
    rounds: rounds per step, at most.
    tol: tolerance on ``alpha`` (absolute).
  """

  def block_terms(ctx, abs_w, d, warm):
    b = jnp.abs(warm) if ctx is None else codes(abs_w, ctx["alpha"])
    num, den = terms(b, abs_w, d)[:2]
    return {"num": num, "den": den}

  def start(sums, n, shape):
    return {"alpha": alpha(sums), "done": jnp.zeros(shape, bool)}

  def step(ctx, sums, n):
    a, done, _ = quantizers._alternate_round(ctx["alpha"], ctx["done"], alpha(sums), tol)
    return {"alpha": a, "done": done}

  return BlockedSolver(block_terms, start, step, lambda ctx: ctx["alpha"], rounds, warm=True)


class TernaryProjection(Projection):
  """Loss-aware ternary weights (LAT): codes in ``{-1, 0, +1}``, one or two scales.

  ``solver="exact"`` (LATe) is the exact minimizer of ``sum d (alpha b - w)^2``
  (:func:`lab_optax.proximal_ternarize`); ``"approximate"`` (LATa) alternates
  ``alpha`` and the threshold ``alpha / 2`` from the previous step's codes,
  at most ``rounds`` rounds, until ``alpha`` moves by less than ``tol``.
  ``scales=2`` has separate ``alpha+`` and ``alpha-`` (LAT2). The first
  projection, with constant ``d``, is the exact L2-optimal ternary one.

  Args:
    solver: ``"exact"`` or ``"approximate"``.
    scales: 1 or 2.
    rounds: the approximate solver's rounds per step, at most.
    tol: the approximate solver's tolerance on ``alpha`` (absolute).
  """

  levels = (-1.0, 0.0, 1.0)

  def __init__(self, solver: str = "exact", scales: int = 1, rounds: int = 10, tol: float = 1e-6):
    _check_choice("solver", solver, ("exact", "approximate"))
    _check_choice("scales", scales, (1, 2))
    if isinstance(rounds, bool) or not (isinstance(rounds, int) and rounds >= 0):
      raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    self.solver, self.num_scales, self.rounds, self.tol = solver, scales, rounds, tol
    self.warm_start = solver == "approximate"

  def __call__(self, w, d, axis=None, codes=None):
    if self.solver == "exact":
      return quantizers.ternary_exact(w, d, axis, scales=self.num_scales)
    return quantizers.ternary_approximate(
      w, d, axis, codes, self.rounds, self.tol, scales=self.num_scales
    )

  def initial(self, w, axis=None):
    return quantizers.ternary_exact(w, None, axis, scales=self.num_scales)

  def blocked_solver(self, guard_zero_d):
    # LATa with one scale; LATe's sort and LAT2 keep the reference. With d > 0
    # (a positive eps) the sums over a support with no d vanish only when it is
    # empty, where _lat_alpha_from_sums gives 0 without the unweighted sums.
    if guard_zero_d or self.solver != "approximate" or self.num_scales != 1:
      return None

    def alpha(sums):
      return quantizers._lat_alpha_from_sums(sums["num"], sums["den"], 0.0, 0.0)

    def support(abs_w, a):
      return abs_w > a / 2

    return _alternating_solver(alpha, support, quantizers._lat_terms, self.rounds, self.tol)

  def _key(self):
    return (self.solver, self.num_scales, self.rounds, self.tol)

  def __eq__(self, other):
    return type(other) is type(self) and other._key() == self._key()

  def __hash__(self):
    return hash((type(self), self._key()))

  def __repr__(self):
    return f"TernaryProjection(solver={self.solver!r}, scales={self.num_scales})"


class MbitProjection(Projection):
  """Loss-aware m-bit weights (LAQ): ``alpha`` times linear or logarithmic levels.

  Levels (``n = 2^(bits-1) - 1``): linear ``{0, +-1/n, ..., +-1}``, logarithmic
  ``{0, +-2^-(n-1), ..., +-1/2, +-1}``. Alternates the nearest levels of
  ``clip(w / alpha, -1, 1)`` and the weighted least-squares ``alpha``, from the
  previous step's codes (see :func:`lab_optax.proximal_quantize`).

  Args:
    bits: from 2 to 8.
    levels: ``"linear"`` or ``"log"``.
    rounds: rounds per step, at most.
    tol: tolerance on ``alpha`` (absolute).
  """

  warm_start = True

  def __init__(self, bits: int = 3, levels: str = "linear", rounds: int = 10, tol: float = 1e-6):
    self.level_set = quantizers.quantize_levels(bits, levels)  # validates bits and levels
    if isinstance(rounds, bool) or not (isinstance(rounds, int) and rounds >= 0):
      raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    self.bits, self.kind, self.rounds, self.tol = bits, levels, rounds, tol
    self.levels = tuple(float(x) for x in self.level_set)
    n = 2 ** (bits - 1) - 1
    # Every value is an integer multiple of scale / divisor.
    self.divisor = n if levels == "linear" else 2 ** (n - 1)

  def __call__(self, w, d, axis=None, codes=None):
    return quantizers.mbit_approximate(
      w, d, axis, bits=self.bits, levels=self.kind, codes=codes, rounds=self.rounds, tol=self.tol
    )

  def blocked_solver(self, guard_zero_d):
    # With d > 0, sum(d |b| |w|) = 0 only where every |b| |w| is 0: the
    # unweighted sums would give 0 too.
    if guard_zero_d:
      return None
    magnitude = quantizers._mbit_magnitude(self.level_set, jnp.float32)

    def alpha(sums):
      # max|w| only where the least squares give 0 (every code 0): computed then.
      a = quantizers._mbit_alpha_from_sums(sums["num"], sums["den"], 0.0, 0.0, 0.0)
      max_abs = lax.cond(jnp.any(a <= 0), sums["max_abs"], lambda: jnp.zeros_like(a))
      return jnp.where(a > 0, a, max_abs)

    return _alternating_solver(alpha, magnitude, quantizers._mbit_terms, self.rounds, self.tol)

  def dequantize(self, codes, scale):
    if self.kind == "log":  # powers of two: exact
      return codes * scale
    # k * (scale / n) with an integer k: exact when scale is n times a short number.
    return jnp.round(codes * self.divisor) * (scale / self.divisor)

  def _key(self):
    return (self.bits, self.kind, self.rounds, self.tol)

  def __eq__(self, other):
    return type(other) is type(self) and other._key() == self._key()

  def __hash__(self):
    return hash((type(self), self._key()))

  def __repr__(self):
    return f"MbitProjection(bits={self.bits}, levels={self.kind!r})"


class TWNProjection(Projection):
  """Ternary Weight Networks (Li and Liu, 2016), the baseline of LAT: ``d`` is ignored.

  ``Delta = 0.7 mean|w|``, codes ``sign(w) 1[|w| > Delta]``,
  ``alpha = mean(|w|)`` over the codes that are not 0.
  """

  levels = (-1.0, 0.0, 1.0)

  def __call__(self, w, d, axis=None, codes=None):
    return quantizers.twn(w, axis)

  def codes(self, w, scale, axis=None):
    del scale
    return jnp.where(jnp.isnan(w), w, self.codes_from(w, self.aux(w, axis)))

  def aux(self, w, axis=None):
    """The threshold ``Delta = 0.7 mean|w|``."""
    red = quantizers._normalize_axis(axis, w.ndim, "twn")
    total = jnp.sum(jnp.abs(w), axis=red, keepdims=True)
    return quantizers._twn_delta(total, quantizers._count(w, red))

  def codes_from(self, w, aux):
    return quantizers._twn_codes(w, aux)

  def blocked_solver(self, guard_zero_d):
    del guard_zero_d  # d is not used

    def terms(ctx, abs_w, d, warm):
      if ctx is None:
        return {"w": abs_w}
      keep, kept = quantizers._twn_terms(abs_w, ctx["delta"])
      return {"keep": keep, "kept": kept}

    def start(sums, n, shape):
      delta = quantizers._twn_delta(sums["w"], n)
      return {"delta": delta, "scale": jnp.zeros(shape), "done": jnp.zeros(shape, bool)}

    def step(ctx, sums, n):
      scale = quantizers._safe_div(sums["kept"], sums["keep"])
      return {"delta": ctx["delta"], "scale": scale, "done": jnp.ones_like(ctx["done"])}

    return BlockedSolver(terms, start, step, rounds=1, aux=lambda ctx: ctx["delta"])

  def __eq__(self, other):
    return type(other) is type(self)

  def __hash__(self):
    return hash(type(self))

  def __repr__(self):
    return "TWNProjection()"


class AbsmeanProjection(Projection):
  """BitNet b1.58's absmean ternary quantizer (Ma et al., 2024): ``d`` is ignored.

  ``gamma = mean|w|``, codes ``clip(round(w / (gamma + eps)), -1, 1)``, scale
  ``gamma``.

  Args:
    eps: added to ``gamma`` in the division, as BitNet writes it.
  """

  levels = (-1.0, 0.0, 1.0)

  def __init__(self, eps: float = 1e-5):
    self.eps = eps

  def __call__(self, w, d, axis=None, codes=None):
    return quantizers.absmean(w, axis, self.eps)

  def codes(self, w, scale, axis=None):
    del scale
    return jnp.where(jnp.isnan(w), w, self.codes_from(w, self.aux(w, axis)))

  def aux(self, w, axis=None):
    """``gamma = mean|w|``, unrounded."""
    red = quantizers._normalize_axis(axis, w.ndim, "absmean")
    total = jnp.sum(jnp.abs(w), axis=red, keepdims=True)
    return quantizers._absmean_gamma(total, quantizers._count(w, red))

  def codes_from(self, w, aux):
    return quantizers._absmean_codes(w, aux, self.eps)

  def blocked_solver(self, guard_zero_d):
    del guard_zero_d  # d is not used

    def start(sums, n, shape):
      return {"scale": quantizers._absmean_gamma(sums["w"], n)}

    return BlockedSolver(
      lambda ctx, abs_w, d, warm: {"w": abs_w}, start, aux=lambda ctx: ctx["scale"]
    )

  def __eq__(self, other):
    return type(other) is type(self) and other.eps == self.eps

  def __hash__(self):
    return hash((type(self), self.eps))

  def __repr__(self):
    return f"AbsmeanProjection(eps={self.eps})"


def _proximal(name: str, projection: Projection, w: Any, d: Any, per_channel: bool) -> Any:
  def one(path, w, d):
    where = jax.tree_util.keystr(path) or "<root>"
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(
        f"{name}: the leaf at {where} has dtype {w.dtype}; quantized weights must be floating"
      )
    w32 = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    try:
      codes, scale = projection(w32, d, reduction_axes(w.ndim, per_channel))
    except ValueError as e:
      raise ValueError(f"{e} (leaf at {where})") from None
    return projection.dequantize(codes, scale).astype(w.dtype)

  if d is None:
    return jax.tree_util.tree_map_with_path(lambda path, w: one(path, w, None), w)
  return jax.tree_util.tree_map_with_path(one, w, d)


def proximal_ternarize(
  w: Any, d: Any, *, solver: str = "exact", scales: int = 1, per_channel: bool = False
) -> Any:
  r"""The loss-aware ternary projection (LAT) of Hou and Kwok (ICLR 2018).

  For each weight tensor, solves

  .. math::

    \min_{\alpha > 0,\ b \in \{-1, 0, 1\}^n} \sum_i d_i (\alpha b_i - w_i)^2

  exactly (``solver="exact"``: the best support is the ``k`` largest
  ``|w|`` for some ``k``, found over every ``k``) or by alternating ``alpha``
  and the threshold ``alpha / 2`` from ``sign(w)``, at most 10 rounds,
  tolerance 1e-6 on ``alpha`` (``"approximate"``, as the authors' code).
  ``scales=2`` gives separate scales to positive and negative codes. Works on
  one array or matching pytrees, and under :func:`jax.jit`.

  Args:
    w: an array or a pytree of arrays.
    d: positive curvature with the structure of ``w`` (``None``: constant,
      which gives the L2-optimal ternary projection).
    solver: ``"exact"`` or ``"approximate"``.
    scales: 1 or 2.
    per_channel: one scale per slice along the last axis.

  Returns:
    ``alpha * codes`` with the structure and dtypes of ``w``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import proximal_ternarize
    >>> proximal_ternarize(jnp.array([1.0, 0.9, 0.1, -1.1]), None)
    Array([ 1.,  1.,  0., -1.], dtype=float32)
  """
  return _proximal("proximal_ternarize", TernaryProjection(solver, scales), w, d, per_channel)


def proximal_quantize(
  w: Any, d: Any, *, bits: int = 3, levels: str = "linear", per_channel: bool = False
) -> Any:
  r"""The loss-aware m-bit projection (LAQ) of Hou and Kwok (ICLR 2018).

  For each weight tensor, minimizes :math:`\sum_i d_i (\alpha b_i - w_i)^2`
  over ``alpha`` and codes ``b`` on ``bits``-bit linear or logarithmic levels
  by alternating the nearest levels and the weighted least-squares ``alpha``,
  from ``alpha = max|w|``, at most 10 rounds (tolerance 1e-6 on ``alpha``).

  Args:
    w: an array or a pytree of arrays.
    d: positive curvature with the structure of ``w`` (``None``: constant).
    bits: from 2 to 8.
    levels: ``"linear"`` or ``"log"``.
    per_channel: one scale per slice along the last axis.

  Returns:
    ``alpha * codes`` with the structure and dtypes of ``w``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import proximal_quantize
    >>> q = proximal_quantize(jnp.array([0.0, 1.1, 1.9, -3.0]), None, bits=3)
    >>> (q / jnp.abs(q).max() * 3).round()  # on the levels alpha * k / 3
    Array([ 0.,  1.,  2., -3.], dtype=float32)
  """
  return _proximal("proximal_quantize", MbitProjection(bits, levels), w, d, per_channel)

"""Adam on latent weights followed by a closed-form projection onto the binary set.

One transformation, :func:`projected_adam`, serves LAB, BWN and BinaryConnect:
the methods differ only in the scale function that picks ``alpha`` (see
``projections.py``). Params always hold the binarized weights
``alpha * sign(latent)``; the full-precision latent weights live in the state.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from lab_optax._src import fused, projections
from lab_optax._src import masks as masks_lib

NO_PARAMS_MSG = (
  "lab_optax transformations need the current params: call "
  "`tx.update(grads, opt_state, params)`. They must be the last "
  "transformation of a chain, since they return `new_params - params`."
)

_MASKED = optax.MaskedNode()


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


class ProjectedAdamState(NamedTuple):
  """State of :func:`projected_adam` (and so of :func:`lab`, :func:`bwn`, :func:`binary_connect`).

  Leaves that a field does not apply to hold ``optax.MaskedNode()``. Every leaf
  keeps its shape and dtype across ``update``.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32: number of updates so far.
  mu: optax.Updates  # First moment, like params (mu_dtype); masked for integer leaves.
  nu: optax.Updates  # Second moment, like params; masked for integer leaves.
  latent: optax.Params  # Full-precision latent weights of binarized leaves (latent_dtype).
  # Scale of binarized leaves: shape (), or (out,) per channel; float32, or the
  # params' dtype if wider (float64 under x64). Not params-shaped: a scalar per
  # tensor, so optax.tree.map_params passes it to transform_non_params.
  alpha: optax.Params
  # The projection (static: a pytree node without leaves), so that
  # quantize_params can rebuild the params from the latent weights.
  projection: Any = None


_IMPLEMENTATIONS = (None, "reference", "blocked")


def _check_hyperparams(b1: Any, b2: Any, eps: Any, clip: Any) -> None:
  def number(x):  # Python and NumPy scalars; arrays and tracers are not checked
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

  # Written so that NaN fails every check.
  for name, value in (("b1", b1), ("b2", b2)):
    if number(value) and not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {value}")
  if number(eps) and not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if number(clip) and not clip > 0:
    raise ValueError(f"clip must be > 0 or None, got {clip}")


def _alpha_dtype(param_dtype: Any) -> Any:
  """The dtype of a leaf's alpha, fixed at ``init``: float32, or the params' if wider."""
  return jnp.promote_types(param_dtype, jnp.float32)


class _NotParams:
  """Stands for the alphas in a state made by ``tx.init`` of optax's params placeholder."""

  def __repr__(self) -> str:
    return "<alphas>"


_NOT_PARAMS = _NotParams()


def _is_params_placeholder(params: Any) -> bool:
  # optax.tree.map_params's stand-in for the whole params tree: a pytree node
  # with no children (optax.tree_utils._state_utils._ParamsPlaceholder).
  return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _kept_bits(dtype: Any, divisor: int = 1) -> int:
  """Significant bits kept of ``scale / divisor``: ``P - 2``, less the bits of the largest code."""
  return max(1, jnp.finfo(dtype).nmant + 1 - 2 - math.ceil(math.log2(divisor)))


def _representable_scale(
  scale: jax.Array, scale_old: jax.Array, dtype: Any, divisor: int = 1
) -> jax.Array:
  """:func:`_representable_alpha` of the step ``scale / divisor`` of m-bit levels.

  Every quantized value is an integer ``k`` times the step, ``|k| <= divisor``:
  the step keeps ``P - 2 - ceil(log2(divisor))`` significant bits (at least
  one), so that every value, and the difference of an old and a new one, is
  representable, as for binary weights. ``divisor`` is 1 for binary and ternary
  levels.
  """
  if _is_power_of_two(divisor):  # the step's significand is the scale's
    return _representable_alpha(scale, scale_old, dtype, divisor)
  step = _representable_alpha(scale / divisor, scale_old / divisor, dtype, divisor)
  return step * divisor


def _representable_alpha(
  alpha: jax.Array, alpha_old: jax.Array, dtype: Any, divisor: int = 1
) -> jax.Array:
  """Rounds ``alpha`` so that ``optax.apply_updates`` lands exactly on it.

  ``apply_updates`` computes ``p + (n - p)`` with ``p = +-alpha_old`` and
  ``n = +-alpha``; in floating point that is only exact when ``alpha +- alpha_old``
  is representable. Every alpha is kept on ``B = P - 2`` significant bits
  (``P`` is the precision of the params' dtype: 24 for float32, 8 for bfloat16),
  and then:

  * within a factor of two of ``alpha_old`` (the usual case), that is enough;
  * smaller than ``alpha_old / 2``, alpha is rounded to a multiple of
    ``alpha_old``'s last kept bit (at least one): then ``alpha +- alpha_old``
    is a multiple of it below ``2 ** (P - 1)`` times it, so representable. The
    relative rounding is ``(alpha_old / alpha) * 2 ** -(B + 1)`` at most
    (``3e-5`` for a 100x drop in float32); in bfloat16 a drop of more than
    ``2 ** B = 64``x takes more than one step, and below ``alpha_old`` of
    about ``1e-31`` (where that bit is not a normal float32) alpha halves per
    step at most;
  * larger than ``2 * alpha_old``, alpha grows by a factor of two per step: a
    sign flip from ``-alpha_old`` to ``+alpha`` is not exact beyond it.

  So every binarized leaf holds exactly the two values ``+-alpha`` after every
  step (in float16, for alphas in its normal range, above ``6e-5``).
  """
  bits = _kept_bits(dtype, divisor)
  alpha = jnp.where(alpha_old > 0, jnp.minimum(alpha, alpha_old * 2.0), alpha)
  rounded = _round_significand(alpha, dtype, divisor)
  _, exponent = jnp.frexp(alpha_old)
  quantum = jnp.ldexp(jnp.ones_like(alpha_old), exponent - bits)  # alpha_old's last kept bit
  # Below float32's smallest normal number the quantum flushes to zero on some
  # backends: there alpha halves per step at most, as it grows.
  normal = quantum >= jnp.finfo(jnp.float32).tiny
  shrunk = jnp.where(
    normal,
    jnp.maximum(jnp.round(alpha / jnp.where(normal, quantum, 1.0)), 1.0) * quantum,
    _round_significand(jnp.maximum(alpha, alpha_old * 0.5), dtype, divisor),
  )
  return jnp.where((alpha_old > 0) & (alpha < alpha_old * 0.5), shrunk, rounded)


def _check_per_channel(params: Any, flags: Any) -> None:
  """One alpha per output channel needs at least two weights per channel."""

  def check(path, p, binarized):
    shape = jnp.shape(p)
    if binarized and (len(shape) < 2 or math.prod(shape[:-1]) == 1):
      raise ValueError(
        f"per_channel=True: the binarized leaf at {jax.tree_util.keystr(path)} has shape "
        f"{shape}, one weight per output channel, which one alpha per channel would keep in "
        "full precision; leave it out of the mask or use one alpha per tensor"
      )

  jax.tree_util.tree_map_with_path(check, params, flags)


def _leaf_paths(tree: Any) -> list[str]:
  return [
    jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def _flatten_like(treedef: Any, tree: Any, what: str) -> list[Any]:
  """``treedef.flatten_up_to(tree)``, with an error that says which tree does not fit."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what} do not have the structure of the params: {e}") from None


def _check_shapes(paths: list[str], params: list[Any], others: list[Any], what: str) -> None:
  for path, p, x in zip(paths, params, others):
    if _is_masked(x):
      continue
    if jnp.shape(x) != jnp.shape(p):
      raise ValueError(
        f"{what} at {path} has shape {jnp.shape(x)}, which does not match the params' "
        f"{jnp.shape(p)}"
      )


def _flat_alpha(alpha: jax.Array, ndim: int, per_channel: bool) -> jax.Array:
  # keepdims alpha -> shape () per tensor, (out,) per channel; both broadcast.
  # Two scales (a leading axis of 2) -> (2,) or (2, out).
  lead = alpha.shape[: alpha.ndim - ndim]
  return alpha.reshape(lead + (alpha.shape[-1:] if per_channel and ndim else ()))


def _axis(w: jax.Array, per_channel: bool) -> Any:
  return projections.reduction_axes(w.ndim, per_channel)


def _is_zero(x: Any) -> bool:
  return type(x) in (int, float) and x == 0


def _round_scale(scale: jax.Array, dtype: Any, divisor: int = 1) -> jax.Array:
  """A first scale whose step ``scale / divisor`` keeps :func:`_kept_bits` bits."""
  if _is_power_of_two(divisor):  # the step's significand is the scale's
    return _round_significand(scale, dtype, divisor)
  return _round_significand(scale / divisor, dtype, divisor) * divisor


def _is_power_of_two(n: int) -> bool:
  # Dividing by a power of two keeps the significand; for logarithmic levels
  # (divisor up to 2**126) it would also overflow an integer or underflow.
  return n & (n - 1) == 0


def _round_significand(alpha: jax.Array, dtype: Any, divisor: int = 1) -> jax.Array:
  bits = _kept_bits(dtype, divisor)
  mantissa, exponent = jnp.frexp(alpha)
  mantissa = jnp.round(mantissa * 2.0**bits) * 2.0**-bits
  return jnp.ldexp(mantissa, exponent)


def projected_adam(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  projection: projections.Projection | None = None,
  scale_fn: projections.ScaleFn | None = None,
  clip: jax.typing.ArrayLike | None = 1.0,
  mask: masks_lib.MaskOrFn = None,
  per_channel: bool = False,
  mu_dtype: Any | None = None,
  latent_dtype: Any | None = None,
  initial_scale_fn: projections.ScaleFn | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  implementation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on full-precision latent weights, followed by a projection onto a quantized set.

  Two pieces: Adam's scaling of the gradient, and a
  :class:`~lab_optax.projections.Projection` that maps the latent weights and
  Adam's curvature ``d`` to codes and scales (the proximal Newton step of
  LAB, or any other quantizer).

  For each binarized leaf with gradient :math:`g_t` (taken at the binarized
  weights that the params hold):

  .. math::

    \begin{align*}
      m_t &\leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
      d_t &\leftarrow \sqrt{v_t / (1-\beta_2^t)} + \varepsilon \\
      w_t &\leftarrow \mathrm{clip}\big(w_{t-1} - \eta_t \, \tfrac{m_t / (1-\beta_1^t)}{d_t},
        -c, c\big) \\
      \hat w_t &\leftarrow \mathrm{scale}_t \cdot b_t, \quad
      (b_t, \mathrm{scale}_t) = \mathrm{projection}(w_t, d_t),
    \end{align*}

  for binary projections :math:`b_t = \mathrm{sign}(w_t)` (``sign(0) = +1``)
  and :math:`\mathrm{scale}_t = \alpha(w_t, d_t)` from ``scale_fn``. The
  update is :math:`\hat w_t - \hat w_{t-1}`, so ``optax.apply_updates``
  writes the new quantized weights into params. Other floating leaves get plain Adam with the
  same hyperparameters and no clipping (complex leaves too, as in
  ``optax.adam``); integer leaves are left untouched. An empty tree is a no-op.

  This transformation needs ``params`` in ``update`` and must be the last one
  of an :func:`optax.chain` (gradient clipping before it is fine). Call
  :func:`binarize_params` after ``init`` so that the first forward pass already
  uses binarized weights.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to ``sqrt(v_hat)``, both in Adam's denominator and in ``d``.
    projection: a :class:`~lab_optax.projections.Projection`, e.g.
      :data:`lab_optax.projections.lab`; give it or ``scale_fn``.
    scale_fn: ``(w, d, axis) -> alpha`` of a binary projection, e.g.
      :func:`lab_optax.projections.lab_scale` (the same as
      ``projection=BinaryProjection(scale_fn, initial_scale_fn)``).
    clip: latent weights of binarized leaves are clipped to ``[-clip, clip]``
      after each step; ``None`` disables clipping.
    mask: ``None`` binarizes every floating leaf with ``ndim >= 2``; otherwise
      a pytree of bools with the params' structure, or a callable
      ``params -> such a pytree``. With :func:`optax.inject_hyperparams`, pass
      ``static_args='mask'`` for a callable mask, as for ``optax.adamw``.
    per_channel: one alpha per slice along the last axis (output channel)
      instead of one per tensor. Every binarized leaf then needs at least two
      weights per channel (``init`` raises ``ValueError`` otherwise).
    mu_dtype: dtype of the first moment; ``None`` uses the params' dtype.
    latent_dtype: dtype of the latent weights; ``None`` uses the params' dtype
      promoted to at least float32.
    initial_scale_fn: with ``scale_fn``, the scale of the first projection
      (``t = 1``, before any gradient, see :func:`quantize_params`); ``None``
      uses ``scale_fn`` with constant ``d``.
    weight_decay: decoupled weight decay, as in :func:`optax.adamw`, applied
      to the latent weights of quantized leaves (and to the other floating
      leaves): ``w <- w - lr * (step + weight_decay * w)``.
    implementation: how binarized leaves are updated; the results agree up to
      rounding (the order of the additions in ``alpha``'s sums, the last bit
      of ``d`` and of the step now and then). ``"reference"``: the
      update equations as elementwise ``jnp`` code. ``"blocked"``: a loop over
      row blocks that updates the state in place, for the built-in projections
      with a blocked solver (LAB, BWN, BinaryConnect, TWN, absmean, LATa with
      one scale and LAQ; see ``fused.supports``), float32, bfloat16 or float16 moments and float32 or
      bfloat16 latent weights (other leaves get the reference); it avoids the
      full-size temporaries that XLA:CPU gives the reference.
      ``None``: blocked for leaves of at least ``2**12`` elements when XLA
      compiles for CPU in a single-device process, the reference otherwise.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (``update`` ignores extra
    keyword arguments, such as ``value=loss``) with state
    :class:`ProjectedAdamState`.
  """
  _check_hyperparams(b1, b2, eps, clip)
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
  if (projection is None) == (scale_fn is None):
    raise ValueError("projected_adam takes a projection or a scale_fn (one of them)")
  if projection is None:
    projection = projections.BinaryProjection(scale_fn, initial_scale_fn)
  elif initial_scale_fn is not None:
    raise ValueError("initial_scale_fn goes with scale_fn; a projection has its own initial()")
  if not isinstance(projection, projections.Projection):
    raise TypeError(
      f"projection must be a lab_optax.projections.Projection, got {type(projection).__name__}"
    )
  # With eps = 0 and no gradient yet, d = 0: guard the division (a traced or
  # zero eps needs it, a positive Python eps does not).
  guard_zero_d = not (isinstance(eps, (int, float)) and eps > 0)

  def init_fn(params):
    flags = masks_lib.resolve_mask(mask, params)
    if per_channel:
      _check_per_channel(params, flags)

    def moment(p, dtype=None):
      if not masks_lib.is_inexact(p):
        return _MASKED
      # Under jit with automatic sharding, zeros depend on no input and would be
      # replicated (or put on one device); shard_alike lays them out like p.
      return shard_alike(jnp.zeros_like(p, dtype=dtype), p)[0]

    def latent(p, binarized):
      if not binarized:
        return _MASKED
      dtype = latent_dtype or jnp.promote_types(p.dtype, jnp.float32)
      return jnp.array(p, dtype=dtype, copy=True)

    def alpha(p, binarized):
      if not binarized:
        return _MASKED
      return _initial_alpha(jnp.asarray(p), projection, per_channel)

    return ProjectedAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(lambda p: moment(p, mu_dtype), params),
      nu=jax.tree.map(moment, params),
      latent=jax.tree.map(latent, params, flags),
      # optax.tree.map_params calls init with a placeholder for the params and
      # maps its function over every field shaped like them: alpha is not (one
      # scalar, or one value per channel, per tensor).
      alpha=_NOT_PARAMS if _is_params_placeholder(params) else jax.tree.map(alpha, params, flags),
      projection=projection,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. value=loss from nnx.Optimizer.update: not needed here
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    count = optax.safe_increment(state.count)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    bc1 = 1 - jnp.asarray(b1, jnp.float32) ** count
    bc2 = 1 - jnp.asarray(b2, jnp.float32) ** count
    hyper = {"lr": lr, "b1": b1, "b2": b2, "eps": eps, "bc1": bc1, "bc2": bc2, "clip": clip}
    hyper["wd"] = weight_decay

    def adam(g, m, v, h=hyper):
      g32 = _f32(jnp.asarray(g))
      m32 = h["b1"] * _f32(m) + (1 - h["b1"]) * g32
      if jnp.iscomplexobj(g32):  # as optax.adam: the second moment of |g|, real-valued
        v32 = h["b2"] * jnp.real(_f32(v)) + (1 - h["b2"]) * (
          jnp.real(g32) ** 2 + jnp.imag(g32) ** 2
        )
      else:
        v32 = h["b2"] * _f32(v) + (1 - h["b2"]) * g32 * g32
      d = jnp.sqrt(v32 / h["bc2"]) + h["eps"]
      step = (m32 / h["bc1"]) / (jnp.where(d > 0, d, 1) if guard_zero_d else d)
      return m32.astype(m.dtype), v32.astype(v.dtype), d, step

    def decayed(step, w, h):
      return step if _is_zero(h["wd"]) else step + h["wd"] * w

    def reference(g, m, v, w, a_old, h=hyper):
      new_m, new_v, d, step = adam(g, m, v, h)
      w32 = _f32(w)
      w32 = w32 - h["lr"] * decayed(step, w32, h)
      if h["clip"] is not None:
        w32 = jnp.clip(w32, -h["clip"], h["clip"])
      axis = projections.reduction_axes(w32.ndim, per_channel)
      # Solvers that start from the previous codes get those of the old latent
      # weights at the old scale: the params, as quantize_params rebuilds them.
      codes = projection.codes(_f32(w), a_old, None) if projection.warm_start else None
      _, a = projection(w32, d, axis, codes)
      aux = projection.aux(w32, axis)
      aux = None if aux is None else _flat_alpha(aux, w32.ndim, per_channel)
      return new_m, new_v, w32, _flat_alpha(a, w32.ndim, per_channel), aux

    def blocks(m, v, w):
      return fused.use_blocked(implementation, projection, m, v, w, guard_zero_d)

    treedef = jax.tree.structure(updates)
    flat = [treedef.flatten_up_to(updates)] + [
      _flatten_like(treedef, tree, what)
      for tree, what in (
        (params, "the params"),
        (state.mu, "the optimizer state's moments"),
        (state.nu, "the optimizer state's moments"),
        (state.latent, "the optimizer state's latent weights"),
        (state.alpha, "the optimizer state's alphas"),
      )
    ]
    paths = _leaf_paths(updates)
    _check_shapes(paths, flat[1], flat[0], "the gradient")
    _check_shapes(paths, flat[1], flat[4], "the latent weight tensor")
    block = fused.block_elements(sum(map(blocks, flat[2], flat[3], flat[4])))

    def blocked(g, m, v, w, a_old, h=hyper):
      return fused.update_binarized(
        g,
        m,
        v,
        w,
        projection=projection,
        learning_rate=h["lr"],
        b1=h["b1"],
        b2=h["b2"],
        eps=h["eps"],
        bc1=h["bc1"],
        bc2=h["bc2"],
        clip=h["clip"],
        weight_decay=h["wd"],
        per_channel=per_channel,
        guard_zero_d=guard_zero_d,
        block=block,
        scale_old=a_old,
      )

    def automatic(g, m, v, w, a_old, h=hyper):
      # Chosen when XLA compiles for a platform: only XLA:CPU needs the blocks.
      return jax.lax.platform_dependent(
        g,
        m,
        v,
        w,
        a_old,
        cpu=functools.partial(blocked, h=h),
        default=functools.partial(reference, h=h),
      )

    def binarized(g, m, v, w, a_old):
      if not blocks(m, v, w):
        return reference(g, m, v, w, a_old)
      fast = blocked if implementation == "blocked" else automatic
      # The blocked loop (a while_loop) has no reverse-mode derivative: it is
      # differentiated as the reference, which it equals up to rounding.
      return _differentiated_as(fast, reference, (g, m, v, w, a_old), hyper)

    def leaf(g, p, m, v, w, a_old):
      if _is_masked(m):  # integer leaf: never touched
        return jnp.zeros_like(p), m, v, w, a_old
      if _is_masked(w):  # full-precision leaf: plain Adam (AdamW with weight_decay)
        new_m, new_v, _, step = adam(g, m, v)
        if masks_lib.is_floating(p):
          step = decayed(step, _f32(jnp.asarray(p)), hyper)
        return (-lr * step).astype(jnp.result_type(g)), new_m, new_v, w, a_old
      p = jnp.asarray(p)
      p32 = _f32(p)
      new_m, new_v, w32, a, aux = binarized(g, m, v, w, a_old)
      a = _representable_scale(a.astype(a_old.dtype), a_old, p.dtype, projection.divisor)
      # The codes at the rounded scale: what quantize_params rebuilds from the
      # state. Methods whose codes do not follow from the scale (TWN, absmean)
      # take them from the solver's threshold, as projection.codes does.
      if aux is None:
        codes = projection.codes(w32, a, _axis(w32, per_channel))
      else:
        codes = jnp.where(jnp.isnan(w32), w32, projection.codes_from(w32, aux))
      new_p = projection.dequantize(codes, a)
      u = (new_p - p32).astype(p.dtype)
      return u, new_m, new_v, w32.astype(w.dtype), a

    out = [leaf(*args) for args in zip(*flat)]
    # An empty tree (optax.masked or optax.partition with nothing selected) is a no-op.
    columns = list(zip(*out)) if out else [[]] * 5
    u, mu, nu, latent, alpha = (treedef.unflatten(column) for column in columns)
    return u, ProjectedAdamState(count, mu, nu, latent, alpha, state.projection)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _differentiated_as(fast, slow, args, hyper):
  """``fast(*args, h=hyper)``, with the derivatives (forward and reverse) of ``slow``.

  Both take the same arguments and compute the same function up to rounding.
  The hyperparameters that are arrays (traced, or under ``inject_hyperparams``)
  are passed as arguments, so derivatives with respect to them are those of
  ``slow`` too; Python numbers and ``None`` stay as they are.
  """
  names = [k for k, x in hyper.items() if not (x is None or type(x) in (bool, int, float))]
  fixed = {k: x for k, x in hyper.items() if k not in names}

  def call(fn):
    return lambda *xs: fn(*xs[: len(args)], h={**fixed, **dict(zip(names, xs[len(args) :]))})

  f = jax.custom_jvp(call(fast))

  @f.defjvp
  def _(primals, tangents):
    return call(fast)(*primals), jax.jvp(call(slow), primals, tangents)[1]

  return f(*args, *(hyper[k] for k in names))


def _make_alias(projection, name, formula):
  def alias(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    clip: jax.typing.ArrayLike | None = 1.0,
    mask: masks_lib.MaskOrFn = None,
    per_channel: bool = False,
    mu_dtype: Any | None = None,
    latent_dtype: Any | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    implementation: str | None = None,
  ) -> optax.GradientTransformationExtraArgs:
    return projected_adam(
      learning_rate,
      b1,
      b2,
      eps,
      projection=projection,
      clip=clip,
      mask=mask,
      per_channel=per_channel,
      mu_dtype=mu_dtype,
      latent_dtype=latent_dtype,
      weight_decay=weight_decay,
      implementation=implementation,
    )

  alias.__name__ = alias.__qualname__ = name
  alias.__doc__ = _ALIAS_DOC.format(name=name, formula=formula)
  return alias


_ALIAS_DOC = r"""{formula}

  Adam runs on full-precision latent weights kept in the optimizer state; after
  each step they are clipped to ``[-clip, clip]`` and projected onto the binary
  set. Params always hold the binarized weights ``alpha * sign(latent)``
  (``sign(0) = +1``), which is what the forward pass uses and what the gradient
  is taken at. See :func:`lab_optax.projected_adam` for the update equations.

  The transformation needs ``params`` in ``update`` (``ValueError`` otherwise)
  and must be the last transformation of a chain: it returns
  ``new_params - params``. Gradient clipping before it is fine.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1: decay rate of Adam's first moment.
    b2: decay rate of Adam's second moment.
    eps: added to ``sqrt(v_hat)`` in Adam's denominator and in ``d``.
    clip: bound of the latent weights of binarized leaves (``None``: no clip).
    mask: ``None`` binarizes every floating leaf with ``ndim >= 2``; otherwise
      a pytree of bools with the params' structure, or a callable
      ``params -> such a pytree`` (a callable pytree of bools is a mask, as in
      :func:`optax.masked`). Unmasked floating and complex leaves get plain
      Adam with the same hyperparameters and no clipping; integer leaves are
      untouched.
    per_channel: one alpha per slice along the last axis instead of one per
      tensor (beyond the paper); every binarized leaf needs at least two
      weights per channel.
    mu_dtype: dtype of the first moment (``None``: the params' dtype).
    latent_dtype: dtype of the latent weights (``None``: the params' dtype,
      promoted to at least float32).
    weight_decay: decoupled weight decay of the latent weights (and of the
      other floating leaves), as in :func:`optax.adamw`.
    implementation: ``"reference"``, ``"blocked"`` or ``None`` (automatic);
      see :func:`lab_optax.projected_adam`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (``update`` ignores extra
    keyword arguments, such as ``value=loss``) whose state is a
    :class:`lab_optax.ProjectedAdamState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, lab_optax
    >>> params = {{"kernel": jnp.array([[0.3, -0.2], [0.1, 0.4]]), "bias": jnp.zeros(2)}}
    >>> tx = lab_optax.{name}(learning_rate=1e-2)
    >>> opt_state = tx.init(params)
    >>> params = lab_optax.binarize_params(params, opt_state)  # t = 1 projection
    >>> grads = jax.grad(lambda p: jnp.sum((p["kernel"] + p["bias"]) ** 2))(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> len(set(jnp.abs(params["kernel"]).ravel().tolist()))  # +-alpha only
    1

  References:
    Hou, Yao and Kwok, `Loss-aware Binarization of Deep Networks
    <https://arxiv.org/abs/1611.01600>`_, ICLR 2017.
  """

lab = _make_alias(
  projections.lab,
  "lab",
  "Loss-aware Binarization (LAB): proximal Newton steps with Adam's curvature.\n\n"
  "  alpha = ||d * w||_1 / ||d||_1 with d = sqrt(v_hat) + eps (Theorem 3.1). The\n"
  "  first projection, before any gradient, uses alpha = mean(|w|).",
)
bwn = _make_alias(
  projections.bwn,
  "bwn",
  "Binary Weight Networks (BWN) baseline: alpha = mean(|w|).",
)
binary_connect = _make_alias(
  projections.binary_connect,
  "binary_connect",
  "BinaryConnect baseline: alpha = 1, so binarized weights are sign(w).",
)


_LOW_BIT_ARGS = """
  Adam runs on full-precision latent weights kept in the optimizer state; after
  each step they are clipped to ``[-clip, clip]`` and projected onto the level
  set. Params always hold the quantized weights ``scale * codes``, which is
  what the forward pass uses and what the gradient is taken at; call
  :func:`lab_optax.quantize_params` after ``init`` for the first projection.
  See :func:`lab_optax.projected_adam` for the update equations and for the
  arguments ``b1``, ``b2``, ``eps``, ``clip``, ``mask``, ``per_channel``,
  ``mu_dtype``, ``latent_dtype``, ``weight_decay`` and ``implementation``
  (the blocked CPU update serves LATa with one scale, LAQ, TWN and absmean,
  the first two with a positive Python ``eps``; LATe and LAT2 get the
  reference update).
"""


def _low_bit(
  projection, learning_rate, b1, b2, eps, clip, mask, per_channel, mu_dtype, latent_dtype,
  weight_decay, implementation,
):  # fmt: skip
  return projected_adam(
    learning_rate,
    b1,
    b2,
    eps,
    projection=projection,
    clip=clip,
    mask=mask,
    per_channel=per_channel,
    mu_dtype=mu_dtype,
    latent_dtype=latent_dtype,
    weight_decay=weight_decay,
    implementation=implementation,
  )


def lat(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  solver: str = "approximate",
  scales: int = 1,
  rounds: int = 0,
  clip: jax.typing.ArrayLike | None = 1.0,
  mask: masks_lib.MaskOrFn = None,
  per_channel: bool = False,
  mu_dtype: Any | None = None,
  latent_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  implementation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Loss-aware ternarization (LAT): proximal Newton steps onto ``alpha * {{-1, 0, +1}}``.

  The follow-up of LAB (Hou and Kwok, ICLR 2018): the same step, with the
  projection :class:`lab_optax.projections.TernaryProjection`.
  ``solver="exact"`` (LATe) minimizes ``sum d (alpha b - w)^2`` exactly;
  ``"approximate"`` (LATa, the default) alternates ``alpha`` and the threshold
  ``alpha / 2``, warm-started from the current codes. ``scales=2`` has
  separate ``alpha+`` and ``alpha-`` (LAT2). The first projection is the exact
  L2-optimal ternary one.

  ``rounds`` is the number of LATa's further rounds per step (tolerance 1e-6
  on ``alpha``). The default, 0, takes one alternation per step: the scale of
  the previous codes on the new latent weights, then the codes of that scale;
  across steps the alternation goes on from where the last one stopped. The
  authors' code runs up to 10 rounds per step (``rounds=10``). Each round is
  one more pass over the weights: on XLA:CPU ``rounds=0`` costs 1.3x to 1.5x
  of Adam's step on a 10M-parameter tree, ``rounds=10`` 3.1x to 3.9x, and over
  a training run of the digits MLP the objective of ``rounds=0`` stayed within
  0.2% of LATe's (0.003% with ``rounds=10``; docs/results.md).
  {args}
  Every quantized leaf holds at most three values after every step. With one
  scale they are exactly ``{{-alpha, 0, alpha}}`` (as LAB's two values); with
  two, each scale is rounded against its own previous value, so a weight that
  flips from ``+alpha+`` to ``-alpha-`` lands within one unit in the last
  place of ``-alpha-`` when ``alpha+ + alpha-`` is not representable.
  As for LAB, a scale grows by at most a factor of two per step (so that a
  weight flipping from ``-alpha_old`` to ``+alpha`` lands exactly), and the
  codes are those of the capped scale: in such a step, early in training,
  LATe's projection is not the exact minimizer.

  Raises:
    ValueError: for an unknown ``solver`` or ``scales`` not 1 or 2.

  References:
    Hou and Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
  """
  return _low_bit(
    projections.TernaryProjection(solver, scales, rounds), learning_rate, b1, b2, eps, clip, mask,
    per_channel, mu_dtype, latent_dtype, weight_decay, implementation,
  )  # fmt: skip


def laq(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  bits: int = 3,
  levels: str = "linear",
  rounds: int = 10,
  clip: jax.typing.ArrayLike | None = 1.0,
  mask: masks_lib.MaskOrFn = None,
  per_channel: bool = False,
  mu_dtype: Any | None = None,
  latent_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  implementation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Loss-aware m-bit quantization (LAQ): ``alpha`` times linear or logarithmic levels.

  With ``n = 2^(bits-1) - 1``: linear levels ``{{0, +-1/n, ..., +-1}}``,
  logarithmic ``{{0, +-2^-(n-1), ..., +-1/2, +-1}}`` (:class:`lab_optax.projections.MbitProjection`).
  Each step alternates the nearest levels of ``clip(w / alpha, -1, 1)`` and the
  weighted least-squares ``alpha = sum(d b w) / sum(d b^2)``, warm-started from
  the current codes, at most 10 rounds. The authors' code takes
  ``sum(|b| d |w|) / sum(|b| d)`` instead, which is the least squares only for
  ternary codes. ``rounds`` bounds the rounds per step (0: the least squares
  of the previous codes only); LAQ needs them more than LATa (docs/results.md).
  {args}
  Every quantized leaf holds at most ``2^bits - 1`` values after every step,
  exactly on its level set: the step ``alpha / n`` (linear) or
  ``alpha * 2^-(n-1)`` (log) keeps ``P - 2 - ceil(log2(n))`` significant bits
  (at least one; ``P``: 24 for float32, 8 for bfloat16, 11 for float16), so
  that ``optax.apply_updates`` lands on it. That holds for linear levels of 2
  to 8 bits in float32, bfloat16 and float16, and for log levels of 2 to 8 bits
  in float32 and 2 to 5 bits in bfloat16 and float16. Log levels of 6 bits and
  more span more binary orders (``2^-30`` and below) than a 16-bit float
  holds: there the smallest levels may be off by a unit in the last place
  (measured: ``1.5e-5`` of ``alpha`` at most).

  Raises:
    ValueError: for ``bits`` outside 2..8 or unknown ``levels``.

  References:
    Hou and Kwok, `Loss-aware Weight Quantization of Deep Networks
    <https://arxiv.org/abs/1802.08635>`_, ICLR 2018.
  """
  return _low_bit(
    projections.MbitProjection(bits, levels, rounds), learning_rate, b1, b2, eps, clip, mask,
    per_channel, mu_dtype, latent_dtype, weight_decay, implementation,
  )  # fmt: skip


def twn(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  clip: jax.typing.ArrayLike | None = 1.0,
  mask: masks_lib.MaskOrFn = None,
  per_channel: bool = False,
  mu_dtype: Any | None = None,
  latent_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  implementation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Ternary Weight Networks (TWN), LAT's baseline: ``Delta = 0.7 mean|w|``, d ignored.

  Codes ``sign(w) 1[|w| > Delta]`` and ``alpha = mean(|w|)`` over them, in the
  same machinery as LAT (Adam on latent weights, clip, gradient at the
  quantized point), as :func:`lab_optax.bwn` is for LAB.
  {args}
  References:
    Li and Liu, `Ternary Weight Networks <https://arxiv.org/abs/1605.04711>`_, 2016.
  """
  return _low_bit(
    projections.TWNProjection(), learning_rate, b1, b2, eps, clip, mask, per_channel,
    mu_dtype, latent_dtype, weight_decay, implementation,
  )  # fmt: skip


def absmean_ternary(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  absmean_eps: float = 1e-5,
  clip: jax.typing.ArrayLike | None = 1.0,
  mask: masks_lib.MaskOrFn = None,
  per_channel: bool = False,
  mu_dtype: Any | None = None,
  latent_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  implementation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """BitNet b1.58's absmean ternary quantizer, in LAT's machinery: d ignored.

  ``gamma = mean|w|``, codes ``clip(round(w / (gamma + absmean_eps)), -1, 1)``,
  weights ``gamma * codes`` (Ma et al., 2024, eqs. 9-11). BitNet trains it with
  a straight-through estimator and AdamW: here the gradient at the quantized
  weights steps the latent weights, which is the same rule, and
  ``weight_decay`` is AdamW's decoupled decay of the latent weights.
  {args}
  References:
    Ma et al., `The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits
    <https://arxiv.org/abs/2402.17764>`_, 2024.
  """
  return _low_bit(
    projections.AbsmeanProjection(absmean_eps), learning_rate, b1, b2, eps, clip, mask,
    per_channel, mu_dtype, latent_dtype, weight_decay, implementation,
  )  # fmt: skip


for _fn in (lat, laq, twn, absmean_ternary):
  _fn.__doc__ = _fn.__doc__.format(args=_LOW_BIT_ARGS)


def _find_states(opt_state: Any) -> list[ProjectedAdamState]:
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ProjectedAdamState))
    if isinstance(s, ProjectedAdamState)
  ]
  if not found:
    raise ValueError(
      "found no lab_optax state in opt_state; pass the state returned by tx.init of lab, "
      "bwn, binary_connect or projected_adam (possibly inside optax wrappers)"
    )
  return found


def _per_leaf(params: Any, tree: Any, what: str) -> list[Any]:
  """The entries of ``tree`` at the leaves of ``params``.

  ``optax.MaskedNode()`` in ``tree`` may stand for a whole subtree of params:
  ``optax.masked`` with a prefix mask, or ``optax.partition``, hands the inner
  transformation such a tree.
  """
  try:
    full = jax.tree.broadcast(tree, params, is_leaf=_is_masked)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what} do not have the structure of the params: {e}") from None
  return _flatten_like(jax.tree.structure(params), full, what)


def _merge_masked(a: Any, b: Any, where: str) -> Any:
  """One tree from two whose non-masked parts are disjoint."""

  def merge(x, y):
    if _is_masked(x):
      return y
    if _is_masked(y):
      return x
    raise ValueError(f"two lab_optax states quantize the same leaf ({where})")

  try:
    return jax.tree.map(merge, a, b, is_leaf=_is_masked)
  except (ValueError, TypeError) as e:
    if "two lab_optax states" in str(e):
      raise
    return jax.tree.map(lambda y, x: merge(x, y), b, a, is_leaf=_is_masked)


def binarize_params(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """Puts params on the binary set held by ``opt_state``: ``alpha * sign(latent)``.

  For other projections (ternary, m-bit) it puts them on their level set, as
  :func:`quantize_params`.

  Call it once after ``tx.init(params)``: the latent weights start from the
  full-precision initialization and the params become their first projection
  (``t = 1``: ``alpha = mean(|w|)`` for LAB and BWN, ``1`` for BinaryConnect),
  so the first forward pass already uses binarized weights. It also rebuilds
  binarized params from a restored optimizer state. The state may be nested in
  any optax wrapper (``chain``, ``masked`` with a full or prefix mask,
  ``inject_hyperparams``, ``MultiSteps``, ...), and may hold several lab_optax
  states, for example one per group of an ``optax.partition``; each leaf is
  taken from the state that binarizes it.

  Args:
    params: the params given to ``tx.init``.
    opt_state: the state returned by ``tx.init`` (or a later one).

  Returns:
    params with every binarized leaf replaced by ``alpha * sign(latent)`` in the
    leaf's dtype; other leaves are returned as they are.

  Raises:
    ValueError: if ``opt_state`` holds no lab_optax state, if a state does not
      fit the params (naming the leaf or tree), or if two states binarize the
      same leaf.
  """
  treedef = jax.tree.structure(params)
  flat_params = treedef.flatten_up_to(params)
  paths = _leaf_paths(params)
  chosen: list[Any] = [None] * len(flat_params)
  for state in _find_states(opt_state):
    latent = _per_leaf(params, state.latent, "the optimizer state's latent weights")
    alpha = _per_leaf(params, state.alpha, "the optimizer state's alphas")
    _check_shapes(paths, flat_params, latent, "the latent weight tensor")
    for i, (w, a) in enumerate(zip(latent, alpha)):
      if _is_masked(w):
        continue
      if chosen[i] is not None:
        raise ValueError(
          f"two lab_optax states in opt_state binarize the leaf at {paths[i]}; give each "
          "leaf to one of them (optax.partition, or masks that do not overlap)"
        )
      chosen[i] = (w, a, state.projection)

  def one(p, found):
    if found is None:
      return p
    w, a, projection = found
    p, w = jnp.asarray(p), jnp.asarray(w)
    return _quantized_leaf(w, a, projection, p.dtype)

  return treedef.unflatten(map(one, flat_params, chosen))


def _initial_alpha(p, projection, per_channel):
  """The first projection's scales of one leaf, rounded as the steps keep them."""
  try:
    hash(projection)
  except TypeError:  # a projection that defines __eq__ without __hash__
    return _initial_alpha_of(p, projection, per_channel)
  return _initial_alpha_jit(p, projection, per_channel)


def _initial_alpha_of(p, projection, per_channel):
  axis = projections.reduction_axes(p.ndim, per_channel)
  _, a = projection.initial(_f32(p), axis)
  a = _flat_alpha(a, p.ndim, per_channel).astype(_alpha_dtype(p.dtype))
  return _round_scale(a, p.dtype, projection.divisor)


# Compiled once per projection, shape and dtype: called eagerly (``tx.init`` or
# ``quantize_params`` outside jit), the projection would otherwise dispatch and
# compile op by op (seconds per leaf).
_initial_alpha_jit = jax.jit(_initial_alpha_of, static_argnums=(1, 2))


# Compiled once per projection, shape and dtype: called eagerly (``quantize_params``
# outside jit), the codes would otherwise dispatch and compile op by op.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantized_leaf(w, a, projection, dtype):
  """``scale * codes`` of one latent leaf at the state's scales, in ``dtype``."""
  per_channel = a.ndim - (projection.num_scales > 1) >= 1
  codes = projection.codes(_f32(w), a, _axis(w, per_channel))
  return projection.dequantize(codes, a).astype(dtype)


def quantize_params(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """Puts params on the level set that ``opt_state`` describes, for any method.

  After ``tx.init(params)`` this is the first projection (``t = 1``, the
  method's projection with constant ``d``): call it once so that the first
  forward pass already uses quantized weights. After a restore it gives the
  params as they were saved: the codes that the projection gives the latent
  weights at the state's scales. The state may be nested in any optax
  wrapper and hold several lab_optax states; see :func:`binarize_params`,
  which is the same function.

  Args:
    params: the params given to ``tx.init``.
    opt_state: the state returned by ``tx.init`` (or a later one).

  Returns:
    params with every quantized leaf replaced by ``scale * codes`` in the
    leaf's dtype; other leaves are returned as they are.
  """
  return binarize_params(params, opt_state)


def latent_weights(opt_state: optax.OptState) -> optax.Params:
  """The full-precision latent weights held in ``opt_state``.

  Args:
    opt_state: a state of :func:`lab`, :func:`bwn`, :func:`binary_connect` or
      :func:`projected_adam`, possibly nested in optax wrappers. With several
      lab_optax states (``optax.partition``), their latent weights are merged.

  Returns:
    A pytree with the params' structure: the latent weights at binarized
    leaves and ``optax.MaskedNode()`` elsewhere (a ``MaskedNode`` may stand for
    a whole subtree that an ``optax.masked`` prefix mask leaves out).
  """
  states = _find_states(opt_state)
  latent = states[0].latent
  for state in states[1:]:
    latent = _merge_masked(latent, state.latent, "latent weights")
  return latent

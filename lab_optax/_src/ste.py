"""Straight-through estimators: binary activations and self-quantizing kernels."""

import functools

import jax
import jax.numpy as jnp

from lab_optax._src import projections
from lab_optax._src.transform import _round_scale


@jax.custom_jvp
def sign_ste(x: jax.typing.ArrayLike) -> jax.Array:
  r"""Binary activation with the straight-through estimator of BNN.

  Forward: ``binary_sign(x)`` (``+1`` for ``x >= 0``, ``-1`` otherwise).
  Backward: the incoming gradient where ``|x| <= 1`` (inclusive), zero
  elsewhere:

  .. math::

    \frac{\partial \,\mathrm{sign\_ste}(x)}{\partial x} = 1_{|x| \le 1}

  Args:
    x: pre-activations.

  Returns:
    An array of ``+-1`` with the dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from lab_optax import sign_ste
    >>> sign_ste(jnp.array([-2.0, -0.5, 0.0, 1.0, 3.0]))
    Array([-1., -1.,  1.,  1.,  1.], dtype=float32)
    >>> jax.grad(lambda x: sign_ste(x).sum())(jnp.array([-2.0, -0.5, 0.0, 1.0, 3.0]))
    Array([0., 1., 1., 1., 0.], dtype=float32)
  """
  return projections.binary_sign(x)


@sign_ste.defjvp
def _sign_ste_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  x = jnp.asarray(x)
  gate = (jnp.abs(x) <= 1).astype(jnp.result_type(t))
  return sign_ste(x), t * gate


@jax.custom_jvp
def binarize_ste(kernel: jax.Array) -> jax.Array:
  """Binarizes a kernel for the forward pass, with an identity gradient.

  A kernel that is already binarized (one magnitude per tensor, or per output
  channel along the last axis when a channel has more than one weight), as
  the params are when trained with :func:`lab_optax.lab`,
  :func:`lab_optax.bwn` or :func:`lab_optax.binary_connect`, passes through
  unchanged, keeping the optimizer's alpha. Any other kernel becomes ``mean(|w|) * binary_sign(w)``
  (BWN), so a binary layer trained with a plain optimizer such as
  ``optax.adam`` trains as BWN. Either way the gradient with respect to the
  kernel is the gradient with respect to the binarized kernel
  (straight-through, no gate and no gradient through alpha).

  Args:
    kernel: a weight tensor whose last axis is the output channels.

  Returns:
    The binarized kernel, with the dtype of ``kernel``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import binarize_ste
    >>> binarize_ste(jnp.array([[0.5, -1.5], [1.0, -0.0]]))
    Array([[ 0.75, -0.75],
           [ 0.75,  0.75]], dtype=float32)
    >>> binarize_ste(jnp.array([[0.3, -0.3], [-0.3, 0.3]]))  # already binary
    Array([[ 0.3, -0.3],
           [-0.3,  0.3]], dtype=float32)
  """
  return _binarize(kernel, keep_zeros=False)


def _binarize(kernel: jax.Array, *, keep_zeros: bool) -> jax.Array:
  """``binarize_ste``'s forward pass; ``keep_zeros`` treats exact zeros as masked out.

  With ``keep_zeros`` (a kernel multiplied by a mask), zeros stay zero and are
  left out of the check and of ``mean(|w|)``.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim == 0 or kernel.size == 0:
    return kernel
  absk = jnp.abs(kernel)
  # One magnitude per output channel; a kernel with one weight per channel
  # (a single input row) counts as binarized only with one magnitude in all.
  axes = tuple(range(kernel.ndim - 1)) if kernel.size > kernel.shape[-1] else None
  if keep_zeros:
    live = kernel != 0
    largest = jnp.max(absk, axis=axes)
    smallest = jnp.min(jnp.where(live, absk, jnp.inf), axis=axes)
    is_binary = jnp.all((largest == smallest) | (largest == 0))
  else:
    live = None
    is_binary = jnp.all(jnp.max(absk, axis=axes) == jnp.min(absk, axis=axes))

  def bwn(k):
    if live is None:
      alpha = projections.bwn_scale(k)
    else:
      count = jnp.maximum(jnp.sum(live), 1).astype(jnp.float32)
      alpha = jnp.sum(jnp.abs(k).astype(jnp.float32)) / count
    out = alpha * projections.binary_sign(k)
    return (out if live is None else jnp.where(live, out, 0)).astype(k.dtype)

  # lax.cond runs only one branch: a binarized kernel costs the check alone.
  return jax.lax.cond(is_binary, lambda k: k, bwn, kernel)


@binarize_ste.defjvp
def _binarize_ste_jvp(primals, tangents):
  return binarize_ste(primals[0]), tangents[0]


@jax.custom_jvp
def binarize_masked_ste(kernel: jax.Array) -> jax.Array:
  """:func:`binarize_ste` of a masked kernel: exact zeros are masked-out taps and stay zero.

  Used by :class:`lab_optax.nnx.BinaryConv` with a kernel ``mask`` (the kernel
  arrives multiplied by it). The check and ``mean(|w|)`` only see the other
  entries. A weight that is exactly zero counts as masked out.
  """
  return _binarize(kernel, keep_zeros=True)


@binarize_masked_ste.defjvp
def _binarize_masked_ste_jvp(primals, tangents):
  return binarize_masked_ste(primals[0]), tangents[0]


def _channel_axes(kernel: jax.Array) -> tuple[int, ...] | None:
  """All axes but the last, where a channel holds more than one weight (else ``None``).

  A kernel with one weight per channel is on any level set per channel, so it
  only counts as quantized with one scale for the whole tensor.
  """
  if kernel.ndim == 0 or kernel.size <= kernel.shape[-1]:
    return None
  return tuple(range(kernel.ndim - 1))


def _top_scale(w: jax.Array, projection: projections.Projection, axis) -> jax.Array:
  """The scale that puts the largest magnitude of each group on the top level."""
  levels = projection.levels
  if projection.num_scales == 1:
    top = max(abs(level) for level in levels)
    return jnp.max(jnp.abs(w), axis=axis, keepdims=True) / top
  top_pos = max((level for level in levels if level > 0), default=1.0)
  top_neg = max((-level for level in levels if level < 0), default=1.0)
  pos = jnp.max(jnp.where(w > 0, w, 0), axis=axis, keepdims=True) / top_pos
  neg = jnp.max(jnp.where(w < 0, -w, 0), axis=axis, keepdims=True) / top_neg
  return jnp.stack([pos, neg])


def level_codes(
  kernel: jax.Array, projection: projections.Projection, axis: projections.Axis = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Codes and scale of a kernel read from its values, and whether they reproduce it exactly.

  The scale of each group (the tensor, or each output channel with ``axis``)
  puts its largest magnitude on the top level (with two scales: the largest
  positive weight and the largest negative one); the codes are the nearest
  levels (:meth:`Projection.codes` of the base class). The check is exact:
  ``True`` only if ``projection.dequantize(codes, scale)``, cast to the
  kernel's dtype, equals the kernel everywhere. It recognizes every kernel
  that lab_optax's optimizers leave on the level set, except an m-bit group
  whose largest code is below the top level (which LAQ's solver, started from
  ``max|w|``, does not leave in practice).

  Args:
    kernel: a floating array.
    projection: the :class:`~lab_optax.projections.Projection` whose levels
      are checked.
    axis: the axes each scale is reduced over (``None``: one per tensor).

  Returns:
    ``(codes, scale, exact)``: codes in at least float32, the scale reduced
    with keepdims (stacked for two scales), and a boolean scalar.
  """
  return _level_codes(jnp.asarray(kernel), projection, axis)


# Jitted (static projection and axes): called eagerly, by summary and
# pack_model, these passes would otherwise compile op by op at every call.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _level_codes(kernel, projection, axis):
  w = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  scale = _top_scale(w, projection, axis)
  codes = projections.Projection.codes(projection, w, scale, axis)
  exact = jnp.all(projection.dequantize(codes, scale).astype(kernel.dtype) == kernel)
  return codes, scale, exact


def on_level_set(
  kernel: jax.Array, projection: projections.Projection, *, masked: bool = False
) -> jax.Array:
  """Whether a kernel is already on ``projection``'s level set, as the optimizer keeps it.

  One scale per tensor, or one per output channel (last axis) when a channel
  holds more than one weight; see :func:`level_codes`. With ``masked``, exact
  zeros are masked-out taps and pass whatever the levels. Jittable: a few
  reductions and elementwise passes over the kernel.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import projections
    >>> from lab_optax._src.ste import on_level_set
    >>> k = jnp.array([[0.5, 0.0], [-0.5, 0.5]])
    >>> bool(on_level_set(k, projections.TernaryProjection()))
    True
    >>> bool(on_level_set(k, projections.bwn))  # a zero is not binary
    False
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim == 0 or kernel.size == 0:
    return jnp.asarray(True)
  return _on_level_set(kernel, projection, masked)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _on_level_set(kernel, projection, masked):
  def exact(axis):
    if not masked:
      return _level_codes(kernel, projection, axis)[2]
    w = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
    scale = _top_scale(w, projection, axis)
    codes = projections.Projection.codes(projection, w, scale, axis)
    same = projection.dequantize(codes, scale).astype(kernel.dtype) == kernel
    return jnp.all(same | (kernel == 0))

  axes = _channel_axes(kernel)
  return exact(None) if axes is None else exact(None) | exact(axes)


def _bwn_initial(projection: projections.Projection) -> bool:
  """A binary projection whose own rule is BWN's (LAB's and BWN's): binarize_ste's case."""
  return (
    isinstance(projection, projections.BinaryProjection)
    and projection.initial_scale_fn is projections.bwn_scale
  )


def quantize_ste(
  kernel: jax.Array, projection: projections.Projection, *, masked: bool = False
) -> jax.Array:
  """Quantizes a kernel for the forward pass with ``projection``'s rule, with an identity gradient.

  The generalization of :func:`binarize_ste` to any
  :class:`~lab_optax.projections.Projection`. A kernel already on the
  projection's level set (one scale per tensor, or per output channel), as
  the params are when trained with the matching lab_optax optimizer
  (:func:`lab_optax.lat` for a
  :class:`~lab_optax.projections.TernaryProjection`, :func:`lab_optax.laq` for
  an :class:`~lab_optax.projections.MbitProjection`, ...), passes through
  unchanged. Any other kernel becomes the method's own projection with a
  constant curvature, ``projection.initial(kernel)`` with one scale per
  tensor (BWN for LAB and BWN, the L2-optimal ternary projection for LAT,
  TWN's and absmean's rules for theirs), so a layer trained with a plain
  optimizer such as ``optax.adam`` trains with that rule and a
  straight-through gradient (no gate, no gradient through the scale). A
  ternary kernel is never re-binarized: it is on the ternary level set.

  Args:
    kernel: a weight tensor whose last axis is the output channels.
    projection: the quantizer, e.g. ``lab_optax.projections.TernaryProjection()``.
    masked: exact zeros are masked-out taps (a kernel multiplied by a mask):
      they pass the check and stay zero. For binary LAB and BWN they are also
      left out of ``mean(|w|)`` (:func:`binarize_ste`'s masked form); the
      other rules see them as zeros.

  Returns:
    The quantized kernel, with the dtype of ``kernel``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lab_optax import projections, quantize_ste
    >>> ternary = projections.TernaryProjection()
    >>> quantize_ste(jnp.array([[1.0, 0.9], [0.1, -1.1]]), ternary)
    Array([[ 1.,  1.],
           [ 0., -1.]], dtype=float32)
    >>> quantize_ste(jnp.array([[0.3, 0.0], [-0.3, 0.3]]), ternary)  # already ternary
    Array([[ 0.3,  0. ],
           [-0.3,  0.3]], dtype=float32)
  """
  if _bwn_initial(projection):
    return binarize_masked_ste(kernel) if masked else binarize_ste(kernel)
  return _quantize_ste(kernel, projection, masked)


def _quantize(kernel: jax.Array, projection: projections.Projection, masked: bool) -> jax.Array:
  kernel = jnp.asarray(kernel)
  if kernel.ndim == 0 or kernel.size == 0:
    return kernel

  def rule(k):
    w = k.astype(jnp.promote_types(k.dtype, jnp.float32))
    _, scale = projection.initial(w, None)
    # The scale rounded as the optimizer rounds its first one, so that the values are
    # exact multiples of scale / divisor and read back as on the level set.
    scale = _round_scale(scale, k.dtype, projection.divisor)
    out = projection.dequantize(projection.codes(w, scale, None), scale).astype(k.dtype)
    return jnp.where(k != 0, out, jnp.zeros_like(out)) if masked else out

  # lax.cond runs only one branch: a kernel on the level set costs the check alone.
  return jax.lax.cond(on_level_set(kernel, projection, masked=masked), lambda k: k, rule, kernel)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _quantize_ste(kernel: jax.Array, projection: projections.Projection, masked: bool) -> jax.Array:
  return _quantize(kernel, projection, masked)


@_quantize_ste.defjvp
def _quantize_ste_jvp(projection, masked, primals, tangents):
  return _quantize_ste(primals[0], projection, masked), tangents[0]

"""Straight-through estimators: binary activations and self-binarizing kernels."""

import jax
import jax.numpy as jnp

from lab_optax._src import projections


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

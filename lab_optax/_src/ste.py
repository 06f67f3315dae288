"""Straight-through estimators: binary activations and self-binarizing kernels."""

from __future__ import annotations

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
  channel along the last axis), as the params are when trained with
  :func:`lab_optax.lab`, :func:`lab_optax.bwn` or
  :func:`lab_optax.binary_connect`, passes through unchanged, keeping the
  optimizer's alpha. Any other kernel becomes ``mean(|w|) * binary_sign(w)``
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
  kernel = jnp.asarray(kernel)
  if kernel.ndim == 0 or kernel.size == 0:
    return kernel
  absk = jnp.abs(kernel)
  axes = tuple(range(kernel.ndim - 1))
  is_binary = jnp.all(jnp.max(absk, axis=axes) == jnp.min(absk, axis=axes))
  # lax.cond runs only one branch: a binarized kernel costs the check alone.
  return jax.lax.cond(
    is_binary,
    lambda k: k,
    lambda k: (projections.bwn_scale(k) * projections.binary_sign(k)).astype(k.dtype),
    kernel,
  )


@binarize_ste.defjvp
def _binarize_ste_jvp(primals, tangents):
  return binarize_ste(primals[0]), tangents[0]

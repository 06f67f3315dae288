"""Helpers that connect an NNX model with lab_optax's optimizers."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lab_optax._src import packing
from lab_optax._src.transform import binarize_params
from lab_optax.nnx.layers import BinaryParam


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def binary_mask(model: nnx.Module, wrt: Any = nnx.Param) -> nnx.State:
  """The optimizer's mask for a model: ``True`` at every :class:`BinaryParam`.

  Args:
    model: an NNX module.
    wrt: the filter the optimizer uses (as in ``nnx.Optimizer(..., wrt=...)``).

  Returns:
    An ``nnx.State`` of bools with one entry per variable selected by ``wrt``,
    to pass as ``mask=`` to :func:`lab_optax.lab`, :func:`lab_optax.bwn` or
    :func:`lab_optax.binary_connect`.

  Example usage::

    >>> import optax, lab_optax
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLinear, binary_mask
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.hidden = BinaryLinear(4, 8, rngs=rngs)
    ...     self.out = nnx.Linear(8, 2, rngs=rngs)   # stays full precision
    >>> model = Net(nnx.Rngs(0))
    >>> mask = binary_mask(model)
    >>> mask["hidden"]["kernel"], mask["out"]["kernel"]
    (True, False)
    >>> tx = lab_optax.lab(1e-3, mask=mask)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """
  return jax.tree.map(
    lambda v: isinstance(v, BinaryParam), nnx.state(model, wrt), is_leaf=_is_variable
  )


def binarize_model(model: nnx.Module, optimizer: nnx.Optimizer) -> None:
  """Writes the optimizer's binarized weights into the model, in place.

  Call it once after ``nnx.Optimizer(model, lab_optax.lab(...), wrt=...)``: the
  latent weights keep the full-precision initialization and the model's
  kernels become their first projection (``t = 1``), as
  :func:`lab_optax.binarize_params` does for plain pytrees. It also restores
  the binarized weights from a restored optimizer state.

  Args:
    model: the model the optimizer was built for.
    optimizer: an ``nnx.Optimizer`` whose ``tx`` is a lab_optax transformation
      (possibly inside optax wrappers).
  """
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  nnx.update(model, binarize_params(params, nnx.as_pure(optimizer.opt_state)))


def _binary_state(model: nnx.Module) -> nnx.State:
  return nnx.as_pure(nnx.state(model, BinaryParam))


def pack_model(model: nnx.Module, *, per_channel: bool | None = None) -> nnx.Module:
  """Replaces every :class:`BinaryParam` kernel by its packed form, in place, for inference.

  Each kernel becomes a :class:`lab_optax.PackedBinary`: its signs, 32 to a
  uint32 word along the reduction axis, and its alpha. The binary layers then
  run from the packed weights: ``alpha * (x @ b)`` for real-valued inputs and
  the XNOR-popcount product for binarized inputs. ``nnx.state(model)`` is then
  the deployable 1-bit network; save it with :func:`lab_optax.save_packed`.

  Args:
    model: a model whose binary kernels are binarized (trained with
      lab_optax's optimizers, or binarized with :func:`binarize_model`).
    per_channel: whether the alphas are per output channel; ``None`` reads it
      from the values.

  Returns:
    ``model``, for chaining.

  Raises:
    ValueError: naming the kernel, if a kernel is not binarized.

  Example usage::

    >>> import jax.numpy as jnp, lab_optax
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLinear, pack_model
    >>> layer = BinaryLinear(64, 4, rngs=nnx.Rngs(0))
    >>> layer.kernel.set_value(lab_optax.binarize_ste(layer.kernel.get_value()))
    >>> x = jnp.ones((2, 64))
    >>> y = layer(x)
    >>> _ = pack_model(layer)
    >>> layer.kernel.get_value().bits.shape  # 4 channels of 64 bits: 2 words each
    (4, 2)
    >>> bool(jnp.allclose(layer(x), y, rtol=1e-6))
    True
  """
  state = _binary_state(model)
  everything = jax.tree.map(lambda _: True, state)
  nnx.update(model, packing.pack(state, everything, per_channel=per_channel))
  return model


def unpack_model(model: nnx.Module) -> nnx.Module:
  """Undoes :func:`pack_model` in place: kernels hold ``alpha * sign`` floats again.

  Args:
    model: a model packed by :func:`pack_model` (or loaded from a packed file).

  Returns:
    ``model``, for chaining.
  """
  state = nnx.state(model, BinaryParam)
  packed = jax.tree.map(
    lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  nnx.update(model, packing.unpack(packed))
  return model

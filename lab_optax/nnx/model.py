"""Helpers that connect an NNX model with lab_optax's optimizers."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

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

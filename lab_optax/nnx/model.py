"""Helpers that connect an NNX model with lab_optax's optimizers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lab_optax._src import packing
from lab_optax._src.ste import binarize_ste
from lab_optax._src.transform import binarize_params, latent_weights
from lab_optax.nnx.layers import BinaryConv, BinaryLinear, BinaryParam, _mark_kernel_binarized


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

  It also marks the binary layers whose kernels the optimizer binarizes: their
  forward pass then uses the kernel as it is, without
  :func:`lab_optax.binarize_ste`'s check that the kernel is binarized (a read
  and a copy of every kernel on every step). Train such a model with that
  optimizer only; a model trained with any other optimizer must not go through
  ``binarize_model``.

  Args:
    model: the model the optimizer was built for.
    optimizer: an ``nnx.Optimizer`` whose ``tx`` is a lab_optax transformation
      (possibly inside optax wrappers).
  """
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  opt_state = nnx.as_pure(optimizer.opt_state)
  nnx.update(model, binarize_params(params, opt_state))
  latent = latent_weights(opt_state)
  binarized = {
    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    for path, w in jax.tree_util.tree_leaves_with_path(
      latent, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    if not isinstance(w, optax.MaskedNode)
  }
  for path, module in nnx.iter_modules(model):
    if (
      isinstance(module, BinaryLinear | BinaryConv)
      and module.binarize_kernel
      and (*path, "kernel") in binarized
    ):
      _mark_kernel_binarized(module)


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


def fold_batch_norm(
  layer: BinaryLinear | BinaryConv, norm: nnx.BatchNorm
) -> BinaryLinear | BinaryConv:
  """A copy of ``layer`` that computes ``norm(layer(x))`` for inference, as one layer.

  With its running statistics, a batch norm is one scale and one shift per
  channel, ``s = scale / sqrt(var + epsilon)`` and
  ``t = bias - mean * s``. Folded into the layer before it, the kernel
  ``alpha * sign(w)`` becomes ``(alpha * s) * sign(w)``: still one magnitude
  per output channel, so still binary, with one alpha per channel (negative
  ``s`` flips the signs). The layer's bias becomes ``bias * s + t``. The batch
  norm's four vectors are gone: put the folded layer in the model and take the
  batch norm out of it (set it to ``None`` and skip it), then
  :func:`pack_model` stores 1 bit per weight and two floats per channel.
  This is what inference engines do (Larq Compute Engine folds batch norms into
  the binary layer's output); it is exact up to float rounding, not bit for
  bit.

  Args:
    layer: a :class:`~lab_optax.nnx.BinaryLinear` or
      :class:`~lab_optax.nnx.BinaryConv`, not packed, whose output feeds
      ``norm`` directly. A kernel that is not binarized yet is binarized as
      the forward pass does it (:func:`lab_optax.binarize_ste`); a layer with
      ``binarize_kernel=False`` is folded in full precision.
    norm: an ``nnx.BatchNorm`` over the last axis with ``layer``'s number of
      output features. Its running statistics are used, as in
      ``model.eval()``.

  Returns:
    A new layer with a bias (``layer`` and ``norm`` are unchanged).

  Raises:
    TypeError: if ``layer`` or ``norm`` is of another type.
    ValueError: if the layer is packed, has a kernel mask or one weight per
      output channel, or the norm's axis or number of features does not fit
      the layer.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLinear, fold_batch_norm
    >>> layer = BinaryLinear(64, 4, use_bias=False, rngs=nnx.Rngs(0))
    >>> norm = nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))
    >>> norm.mean.set_value(jnp.array([0.1, -0.2, 0.3, 0.0]))
    >>> folded = fold_batch_norm(layer, norm)
    >>> x = jnp.ones((2, 64))
    >>> bool(jnp.allclose(folded(x), norm(layer(x)), atol=1e-5))
    True
    >>> folded.kernel.get_value().shape, folded.bias.get_value().shape
    ((64, 4), (4,))
  """
  if not isinstance(layer, BinaryLinear | BinaryConv):
    raise TypeError(
      f"fold_batch_norm: layer must be a BinaryLinear or BinaryConv, got {type(layer).__name__}"
    )
  if not isinstance(norm, nnx.BatchNorm):
    raise TypeError(f"fold_batch_norm: norm must be an nnx.BatchNorm, got {type(norm).__name__}")
  kernel = layer.kernel.get_value()
  name = type(layer).__name__
  if isinstance(kernel, packing.PackedBinary):
    raise ValueError(f"fold_batch_norm: the {name} is packed; fold batch norms before pack_model")
  if getattr(layer, "mask", None) is not None:
    raise ValueError(f"fold_batch_norm: the {name} has a kernel mask, which cannot be folded")
  features = kernel.shape[-1]
  if layer.binarize_kernel and kernel.size <= features:
    raise ValueError(
      f"fold_batch_norm: the {name}'s kernel has one weight per output channel; one alpha per "
      "channel would keep it in full precision"
    )
  if norm.num_features != features:
    raise ValueError(
      f"fold_batch_norm: the BatchNorm has {norm.num_features} features, "
      f"the {name} {features} output features"
    )
  axis = norm.axis if isinstance(norm.axis, tuple | list) else (norm.axis,)
  # The layer's inputs have as many axes as its kernel (batch, spatial, features).
  if len(axis) != 1 or axis[0] not in (-1, kernel.ndim - 1):
    raise ValueError(
      f"fold_batch_norm: the BatchNorm normalizes axis {norm.axis}; only the last axis (-1) folds"
    )

  def value(v, default):
    return default if v is None else jnp.asarray(v.get_value(), jnp.float32)

  f32 = jnp.float32
  scale = value(norm.scale, jnp.ones((features,), f32))
  s = scale * jax.lax.rsqrt(jnp.asarray(norm.var.get_value(), f32) + norm.epsilon)
  shift = (
    value(norm.bias, jnp.zeros((features,), f32)) - jnp.asarray(norm.mean.get_value(), f32) * s
  )
  bias = value(layer.bias, jnp.zeros((features,), f32)) * s + shift
  effective = binarize_ste(kernel) if layer.binarize_kernel else kernel
  folded = nnx.clone(layer)
  # alpha * s rounds alike for +alpha and -alpha: each channel keeps exactly two values.
  folded.kernel.set_value((jnp.asarray(effective, f32) * s).astype(kernel.dtype))
  if folded.bias is None:
    folded.bias = nnx.Param(bias.astype(layer.param_dtype))
    folded.use_bias = True
  else:
    folded.bias.set_value(bias.astype(folded.bias.get_value().dtype))
  return folded

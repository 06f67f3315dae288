"""Helpers that connect an NNX model with lab_optax's optimizers."""

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.nn import dtypes

from lab_optax._src import packing, projections
from lab_optax._src.ste import level_codes, quantize_ste
from lab_optax._src.transform import _find_states, _round_scale, binarize_params
from lab_optax.nnx.layers import (
  BinaryConv,
  BinaryLinear,
  BinaryLSTMCell,
  BinaryParam,
  _BinaryOp,
  _mark_kernel_binarized,
  _op_name,
)
from lab_optax.nnx.summary import _binarized_layout, _is_kernel, _kernel_layout


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
  """Writes the optimizer's quantized weights into the model, in place.

  Call it once after ``nnx.Optimizer(model, lab_optax.lab(...), wrt=...)`` (or
  ``lat``, ``laq``, any lab_optax optimizer): the latent weights keep the
  full-precision initialization and the model's kernels become their first
  projection (``t = 1``), as :func:`lab_optax.quantize_params` does for plain
  pytrees. It also restores the quantized weights from a restored optimizer
  state.

  It also marks the quantized layers whose kernels the optimizer quantizes:
  their kernel quantizer becomes the optimizer's projection (so a default,
  binary layer trained with :func:`lab_optax.lat` knows its kernel is
  ternary), and their forward pass uses the kernel as it is, without
  :func:`lab_optax.quantize_ste`'s check that the kernel is on its level set
  (a read and a copy of every kernel on every step). Train such a model with
  that optimizer only; a model trained with any other optimizer must not go
  through ``binarize_model``.

  Args:
    model: the model the optimizer was built for.
    optimizer: an ``nnx.Optimizer`` whose ``tx`` is a lab_optax transformation
      (possibly inside optax wrappers).

  Example usage::

    >>> import lab_optax
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLinear, binarize_model
    >>> layer = BinaryLinear(8, 4, rngs=nnx.Rngs(0))  # binary by default
    >>> optimizer = nnx.Optimizer(layer, lab_optax.lat(1e-3), wrt=nnx.Param)
    >>> binarize_model(layer, optimizer)
    >>> layer.kernel_quantizer, layer.dot_general.kernel_binarized
    (TernaryProjection(solver='approximate', scales=1), True)
    >>> len(set(abs(layer.kernel.get_value()).ravel().tolist()))  # 0 and alpha
    2
  """
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  opt_state = nnx.as_pure(optimizer.opt_state)
  nnx.update(model, binarize_params(params, opt_state))
  quantized = {}  # kernel path -> the projection that keeps it quantized
  for state in _find_states(opt_state):
    for path, w in jax.tree_util.tree_leaves_with_path(
      state.latent, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    ):
      if not isinstance(w, optax.MaskedNode):
        quantized[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)] = state.projection
  for path, module in nnx.iter_modules(model):
    key = (*path, "kernel")
    if (
      isinstance(module, BinaryLinear | BinaryConv) and module.binarize_kernel and key in quantized
    ):
      _mark_kernel_binarized(module, quantized[key])
  for _, module in nnx.iter_modules(model):
    if isinstance(module, BinaryLSTMCell):  # the cell's quantizer is its matrices' one
      gates = (
        module.ii,
        module.if_,
        module.ig,
        module.io,
        module.hi,
        module.hf,
        module.hg,
        module.ho,
      )
      quantizers = {gate.kernel_quantizer for gate in gates}
      if len(quantizers) == 1:
        module.kernel_quantizer = quantizers.pop()


def _class_name(module: nnx.Module) -> str:
  cls = type(module)
  return f"nnx.{cls.__name__}" if cls.__module__.startswith("flax.nnx") else cls.__name__


def _packed_inference(module: nnx.Module, name: str) -> str | None:
  """Why the binary layer made from ``module`` could not run from its packed ``name``, or ``None``.

  The layers that can: plain ``nnx.Linear`` and ``nnx.Conv`` (exact classes:
  a subclass may compute something else) and the binary layers' full-precision
  kernels (``binarize_kernel=False``), with the default product and dtype
  promotion, which the packed inference replaces, and for a conv no kernel
  mask and a zero padding.
  """
  plain = type(module) in (nnx.Linear, nnx.Conv)
  binary = isinstance(module, BinaryLinear | BinaryConv) and not module.binarize_kernel
  if not (plain or binary):
    return f"no packed inference for {_class_name(module)}"
  if name != "kernel":
    return f"no packed inference for {_class_name(module)}.{name}"
  op = getattr(module, _op_name(module))
  op = op.op if isinstance(op, _BinaryOp) else op
  default = jax.lax.dot_general if isinstance(module, nnx.Linear) else jax.lax.conv_general_dilated
  custom = []
  if op is not default:
    custom.append(f"a custom {_op_name(module)}")
  if module.promote_dtype is not dtypes.promote_dtype:
    custom.append("a custom promote_dtype")
  if module.preferred_element_type is not None:
    custom.append("a preferred_element_type")
  if isinstance(module, nnx.Conv):
    if module.mask is not None:
      custom.append("a kernel mask")
    try:
      packing.normalize_padding(module.padding, len(module.kernel_size))
    except (TypeError, ValueError):
      custom.append(f"padding {module.padding!r}")
  if custom:
    return f"no packed inference for {_class_name(module)} with {' and '.join(custom)}"
  return None


def _to_binary_layer(
  module: nnx.Module, kernel: packing.Packed, projection: projections.Projection
) -> None:
  """Makes ``module`` the quantized layer that computes what it computes, with a packed kernel.

  A plain ``nnx.Linear``/``nnx.Conv`` becomes, in place (same object), a
  :class:`BinaryLinear`/:class:`BinaryConv` with ``binarize_inputs=False``; a
  binary layer with ``binarize_kernel=False`` keeps its class and input
  quantizer. Either way the kernel becomes a :class:`BinaryParam` (with its
  metadata) and the layer quantizes its kernel with ``projection`` (the
  kernel's level set), marked as already quantized (as :func:`binarize_model`
  does), so that the float forward pass uses the kernel as it is: after
  :func:`unpack_model` the layer computes what the original layer computed,
  bit for bit.
  """
  op_name = _op_name(module)
  op = getattr(module, op_name)
  if isinstance(op, _BinaryOp):
    op = dataclasses.replace(op, kernel_quantizer=projection, kernel_binarized=True)
  else:
    op = _BinaryOp(op, projection, None, kernel_binarized=True)
    cls = BinaryLinear if isinstance(module, nnx.Linear) else BinaryConv
    # Both classes only add attributes: the instance layout is the same. object.__setattr__,
    # not nnx's, which would record __class__ as an attribute of the graph node.
    object.__setattr__(module, "__class__", cls)
    module.binarize_inputs = False
    module.input_quantizer = None
  setattr(module, op_name, op)
  module.binarize_kernel = True
  module.kernel_quantizer = projection
  module.kernel = BinaryParam(kernel, **module.kernel.get_metadata())


def _path(path: Sequence[Any], name: str) -> str:
  return "/".join(map(str, (*path, name)))


def _low_bit_reason(found: tuple[str, int]) -> str:
  name, bits = found
  return f"{name}, {bits} bits per weight, but the layer's kernel quantizer is binary"


def _pack_kernel(
  module: nnx.Module, kernel: Any, where: str, per_channel: bool | None
) -> tuple[packing.Packed | None, str | None]:
  """A :class:`BinaryParam` kernel packed on its layer's level set, or why it stays dense.

  Raises ValueError (naming the kernel) if it is not on its quantizer's level set.
  """
  quantizer = getattr(module, "kernel_quantizer", None)
  if isinstance(quantizer, projections.BinaryProjection) or quantizer is None:
    if isinstance(kernel, jax.core.Tracer) or not _is_kernel(kernel):
      return packing.pack(kernel, True, per_channel=per_channel), None
    if _binarized_layout(kernel) is None:
      found = _kernel_layout(kernel)
      if found is not None:  # the layer's forward pass would binarize it: keep it dense
        return None, _low_bit_reason(found)
    return _pack_named(kernel, where, per_channel, None), None
  if isinstance(quantizer, projections.Projection):
    return _pack_named(kernel, where, per_channel, quantizer), None
  # A callable quantizer: the kernel's values tell its level set, if any.
  if _is_kernel(kernel) and not isinstance(kernel, jax.core.Tracer):
    if _kernel_layout(kernel) is not None:
      return _pack_named(kernel, where, per_channel, None), None
  return None, f"kernel quantizer {quantizer!r} is not a Projection and the kernel is not quantized"


def _pack_named(kernel, where, per_channel, projection):
  try:
    return packing.pack(kernel, True, per_channel=per_channel, projection=projection)
  except ValueError as e:
    raise ValueError(f"pack_model: {where}: {e}") from None


def _projection_of(
  kernel: Any, per_channel: bool | None
) -> tuple[projections.Projection, bool] | None:
  """The level set of a plain layer's kernel, recognized from its values, and whether per channel."""
  layout = _binarized_layout(kernel)
  if layout is not None:
    if layout and per_channel is False:
      return None
    return projections.bwn, layout if per_channel is None else per_channel
  return packing.find_level_set(kernel, None, per_channel)


def pack_model(model: nnx.Module, *, per_channel: bool | None = None) -> nnx.Module:
  """Replaces every quantized kernel by its packed form, in place, for inference.

  A binary kernel becomes a :class:`lab_optax.PackedBinary`: its signs, 32 to
  a uint32 word along the reduction axis, and its alpha. A ternary or m-bit
  kernel becomes a :class:`lab_optax.PackedQuantized`: sign-magnitude bit
  planes (2 bits per ternary weight, m per m-bit weight) and its scales. The
  layers then run from the packed weights: ``alpha * (x @ b)`` for real-valued
  inputs and popcounts against the kernel's bit planes for binarized inputs
  (the XNOR-popcount product for binary kernels). ``nnx.state(model)`` is then
  the deployable low-bit network; save it with :func:`lab_optax.save_packed`.

  The kernels packed are every :class:`BinaryParam` (on the level set of the
  layer's kernel quantizer: binary, or the ternary or m-bit projection it was
  trained with) and, recognized by their values, the kernels of plain
  ``nnx.Linear`` and ``nnx.Conv`` layers (and of binary layers with
  ``binarize_kernel=False``) that are quantized, as lab_optax's optimizers
  leave them with their default mask: binary, ternary or m-bit levels with one
  scale per tensor or per output channel (as :func:`lab_optax.pack` reads
  them). Such a plain layer is turned, in place
  (the same Python object), into the :class:`BinaryLinear` or
  :class:`BinaryConv` with the same configuration, ``binarize_inputs=False``
  and the kernel quantizer of its level set; its kernel becomes a
  :class:`BinaryParam`. Its float forward pass is unchanged (the kernel,
  already quantized, is used as it is), so :func:`unpack_model` gives it back.

  Kernels left in full precision (floating ``nnx.Param`` with ``ndim >= 2``
  that are not quantized, or in a layer without packed inference such as
  ``nnx.Embed``, ``nnx.Einsum``, ``nnx.LinearGeneral`` or a conv with a kernel
  mask, and the ternary or m-bit kernel of a layer whose kernel quantizer is
  binary, which its forward pass would binarize) are named in one
  ``UserWarning``, with the reason; :attr:`lab_optax.nnx.ModelSummary.not_packed`
  lists them.

  A packed file holds :class:`BinaryParam` kernels: load it into a freshly
  built model with ``nnx.update(fresh, lab_optax.load_packed(path))``, then
  call ``pack_model(fresh)``, which turns the plain layers that received a
  packed kernel into quantized layers (there is nothing to pack); a model
  built from the quantized layers needs no such call.

  Args:
    model: a model whose quantized kernels are on their level sets (trained
      with lab_optax's optimizers, or quantized with :func:`binarize_model`).
    per_channel: whether the scales are per output channel; ``None`` reads it
      from the values. A plain layer's kernel quantized per channel is left
      dense under ``per_channel=False``.

  Returns:
    ``model``, for chaining.

  Raises:
    ValueError: naming the kernel, if a :class:`BinaryParam` kernel is not on
      the level set of its layer's kernel quantizer (then the model is
      unchanged).

  Warns:
    UserWarning: naming each kernel left in full precision, and why.

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

    A plain layer whose kernel is binarized becomes a binary layer:

    >>> plain = nnx.Linear(64, 4, rngs=nnx.Rngs(0))
    >>> plain.kernel.set_value(lab_optax.binarize_ste(plain.kernel.get_value()))
    >>> y = plain(x)
    >>> _ = pack_model(plain)
    >>> type(plain).__name__, type(plain.kernel).__name__
    ('BinaryLinear', 'BinaryParam')
    >>> bool(jnp.allclose(plain(x), y, rtol=1e-6))
    True
  """
  conversions = []  # (module, packed kernel, projection): applied once nothing can fail
  updates = []  # (BinaryParam, packed kernel)
  dense = []  # (path, reason)
  for path, module in nnx.iter_modules(model):
    for name, variable in vars(module).items():
      where = _path(path, name)
      if isinstance(variable, BinaryParam):
        kernel = variable.get_value()
        if packing.is_packed(kernel):
          continue
        packed, reason = _pack_kernel(module, kernel, where, per_channel)
        if reason is not None:
          dense.append((where, reason))
        else:
          updates.append((variable, packed))
        continue
      if not isinstance(variable, nnx.Param):
        continue
      kernel = variable.get_value()
      if packing.is_packed(kernel):  # loaded from a packed file
        if _packed_inference(module, name) is None:
          conversions.append((module, kernel, packing.leaves.level_set(kernel)))
        continue
      if not _is_kernel(kernel):
        continue
      if isinstance(kernel, jax.core.Tracer):
        dense.append((where, "traced: call pack_model outside jax.jit"))
        continue
      found = _projection_of(kernel, per_channel)
      reason = _packed_inference(module, name)
      if found is None:
        if _binarized_layout(kernel) and per_channel is False:
          reason = "binarized per output channel, but per_channel=False"
        else:
          reason = "not quantized"
      if reason is not None:
        dense.append((where, reason))
        continue
      projection, layout = found
      binary = isinstance(projection, projections.BinaryProjection)
      packed = packing.pack(
        kernel, True, per_channel=layout, projection=None if binary else projection
      )
      conversions.append((module, packed, projection))
  for variable, packed in updates:
    variable.set_value(packed)
  for module, kernel, projection in conversions:
    _to_binary_layer(module, kernel, projection)
  if dense:
    listed = ", ".join(f"{path} ({reason})" for path, reason in dense)
    warnings.warn(
      f"pack_model left {len(dense)} kernel{'s' if len(dense) > 1 else ''} in full precision: "
      f"{listed}",
      UserWarning,
      stacklevel=2,
    )
  return model


def _holds_packed(_path: Any, x: Any) -> bool:
  return isinstance(x, nnx.Variable) and packing.is_packed(x.get_value())


def unpack_model(model: nnx.Module) -> nnx.Module:
  """Undoes :func:`pack_model` in place: kernels hold their quantized floats again.

  The float kernels come back bit for bit. The plain ``nnx.Linear`` and
  ``nnx.Conv`` layers that :func:`pack_model` turned into binary layers stay
  :class:`BinaryLinear` and :class:`BinaryConv`; their forward pass uses the
  binarized kernel as it is, so they compute what the plain layers computed.

  Args:
    model: a model packed by :func:`pack_model` (or loaded from a packed file).

  Returns:
    ``model``, for chaining.
  """
  state = nnx.state(model, _holds_packed)
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

  A ternary or m-bit kernel folds the same way: ``scale * codes`` becomes
  ``(scale * s) * codes`` (codes times the sign of ``s``), one scale (or two)
  per output channel, rounded as lab_optax's optimizers round scales, so
  that the folded kernel is exactly on the level set; the folded layer is
  marked to use it as it is (as :func:`binarize_model` marks a layer). A
  custom (callable) kernel quantizer is applied, and its output folded as a
  full-precision kernel would be.

  Args:
    layer: a :class:`~lab_optax.nnx.BinaryLinear` or
      :class:`~lab_optax.nnx.BinaryConv`, not packed, whose output feeds
      ``norm`` directly. A kernel that is not quantized yet is quantized as
      the forward pass does it (:func:`lab_optax.quantize_ste` with the
      layer's kernel quantizer); a layer with ``binarize_kernel=False`` is
      folded in full precision.
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
  if packing.is_packed(kernel):
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
  quantizer = layer.kernel_quantizer
  folded = nnx.clone(layer)
  if isinstance(quantizer, projections.Projection) and not isinstance(
    quantizer, projections.BinaryProjection
  ):
    folded.kernel.set_value(_fold_levels(quantize_ste(kernel, quantizer), quantizer, s))
    _mark_kernel_binarized(folded, quantizer)
  else:
    if quantizer is None:
      effective = kernel
    elif isinstance(quantizer, projections.Projection):
      effective = quantize_ste(kernel, quantizer)
    else:
      effective = quantizer(kernel)
    # alpha * s rounds alike for +alpha and -alpha: each channel keeps exactly two values.
    folded.kernel.set_value((jnp.asarray(effective, f32) * s).astype(kernel.dtype))
  if folded.bias is None:
    folded.bias = nnx.Param(bias.astype(layer.param_dtype))
    folded.use_bias = True
  else:
    folded.bias.set_value(bias.astype(folded.bias.get_value().dtype))
  return folded


def _fold_levels(kernel: jax.Array, projection: projections.Projection, s: jax.Array) -> jax.Array:
  """``kernel * s`` for a kernel on ``projection``'s levels, kept exactly on them per channel."""
  codes, scale, exact = level_codes(kernel, projection)
  if not bool(exact):
    codes, scale, _ = level_codes(kernel, projection, tuple(range(kernel.ndim - 1)))
  flip = jnp.where(s < 0, -1.0, 1.0)
  codes = codes * flip
  if projection.num_scales == 1:
    scale = scale * jnp.abs(s)
  else:  # the sign flip swaps the positive and the negative scale
    pos = jnp.where(s < 0, scale[1], scale[0])
    neg = jnp.where(s < 0, scale[0], scale[1])
    scale = jnp.stack([pos, neg]) * jnp.abs(s)
  scale = _round_scale(scale, kernel.dtype, projection.divisor)
  return projection.dequantize(codes, scale).astype(kernel.dtype)

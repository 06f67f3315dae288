"""Quantized Flax NNX layers: ``BinaryLinear``, ``BinaryConv`` and ``BinaryLSTMCell``.

Each layer mirrors its ``flax.nnx`` counterpart (same signature, same state
layout) and computes, as Larq's quantized layers::

  output = activation(dot(input_quantizer(x), kernel_quantizer(kernel)) + bias)

The kernel quantizer is binary by default (BWN's rule through
:func:`lab_optax.binarize_ste`) and may be any
:class:`lab_optax.projections.Projection` (ternary, m-bit), a name (``"lat"``,
``"laq"``, ...) or a callable; it keeps a kernel that lab_optax's optimizers
already put on its level set and quantizes any other kernel with a
straight-through gradient (:func:`lab_optax.quantize_ste`). The input quantizer
is :func:`lab_optax.sign_ste` when the inputs are binarized (LAB2, BNN, XNOR)
and the identity otherwise. Kernels are :class:`BinaryParam` so that a model's
quantized weights can be selected with an nnx filter; biases are plain
``nnx.Param``.

After :func:`lab_optax.nnx.pack_model`, a binary kernel holds a
:class:`lab_optax.PackedBinary` (1 bit per weight and its alpha), a ternary or
m-bit one a :class:`lab_optax.PackedQuantized` (2 or m bit planes and its
scales), and the layer runs inference from it: ``alpha * (x @ b)`` for
real-valued inputs, and popcounts of the packed inputs against the kernel's bit
planes for binarized inputs (XNOR-popcount for binary kernels).
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PrecisionLike

from lab_optax._src import packing, projections
from lab_optax._src.ste import quantize_ste, sign_ste

Array = jax.Array
#: A kernel quantizer: a Projection, a name of :data:`KERNEL_QUANTIZERS`, a
#: callable ``kernel -> kernel`` (used as it is), or ``None`` (full precision).
KernelQuantizer = projections.Projection | str | Callable[[Array], Array] | None
#: An input quantizer: ``"ste_sign"`` (:func:`lab_optax.sign_ste`), a callable, or ``None``.
InputQuantizer = str | Callable[[Array], Array] | None

#: The kernel quantizers by name: the projection of the lab_optax optimizer of that name.
KERNEL_QUANTIZERS: Mapping[str, projections.Projection] = MappingProxyType(
  {
    "lab": projections.lab,
    "bwn": projections.bwn,
    "binary_connect": projections.binary_connect,
    "lat": projections.TernaryProjection("approximate", rounds=0),  # lab_optax.lat's
    "laq": projections.MbitProjection(),
    "twn": projections.TWNProjection(),
    "absmean_ternary": projections.AbsmeanProjection(),
  }
)
#: The input quantizers by name (Larq's name for the sign with a straight-through gradient).
INPUT_QUANTIZERS: Mapping[str, Callable[[Array], Array]] = MappingProxyType({"ste_sign": sign_ste})


class BinaryParam(nnx.Param):
  """An ``nnx.Param`` holding a quantized kernel (binary, ternary or m-bit).

  Select a model's quantized weights with ``nnx.state(model, BinaryParam)`` or
  any nnx filter; :func:`binary_mask` turns that into the optimizer's mask.
  """


def paper_kernel_init() -> Initializer:
  """The paper's initializer of dense and conv kernels: U(+-sqrt(1.5 / (fan_in + fan_out))).

  For a conv kernel, fans include the receptive field, as in Glorot's
  initializer (whose bound, ``sqrt(6 / (fan_in + fan_out))``, is twice this).
  """
  return nnx.initializers.variance_scaling(0.25, "fan_avg", "uniform")


def lstm_kernel_init(scale: float = 0.08) -> Initializer:
  """The paper's initializer of LSTM weights: U(-scale, scale), scale = 0.08."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


default_kernel_init = paper_kernel_init()
default_lstm_kernel_init = lstm_kernel_init()
default_bias_init = nnx.initializers.zeros_init()
default_forget_bias_init = nnx.initializers.ones_init()


def _kernel_quantizer(kernel_quantizer: Any, binarize_kernel: bool) -> Any:
  """The layer's kernel quantizer: a Projection, a callable or ``None``."""
  if not binarize_kernel:
    if kernel_quantizer is not None and not (
      isinstance(kernel_quantizer, str) and kernel_quantizer == "bwn"
    ):
      raise ValueError(
        f"binarize_kernel=False gives a full-precision kernel, but kernel_quantizer="
        f"{kernel_quantizer!r} was given; give kernel_quantizer=None instead"
      )
    return None
  if isinstance(kernel_quantizer, str):
    if kernel_quantizer not in KERNEL_QUANTIZERS:
      raise ValueError(
        f"unknown kernel_quantizer {kernel_quantizer!r}; the names are "
        f"{', '.join(map(repr, KERNEL_QUANTIZERS))}, or give a lab_optax.projections.Projection"
      )
    return KERNEL_QUANTIZERS[kernel_quantizer]
  if kernel_quantizer is None or callable(kernel_quantizer):  # a Projection is callable
    return kernel_quantizer
  raise TypeError(
    "kernel_quantizer must be a lab_optax.projections.Projection, a name, a callable or None, "
    f"got {type(kernel_quantizer).__name__}"
  )


def _input_quantizer(input_quantizer: Any, binarize_inputs: bool) -> Any:
  """The layer's input quantizer: a callable or ``None``."""
  if isinstance(input_quantizer, str):
    if input_quantizer not in INPUT_QUANTIZERS:
      raise ValueError(
        f"unknown input_quantizer {input_quantizer!r}; the names are "
        f"{', '.join(map(repr, INPUT_QUANTIZERS))}, or give a callable"
      )
    input_quantizer = INPUT_QUANTIZERS[input_quantizer]
  if input_quantizer is not None and not callable(input_quantizer):
    raise TypeError(
      f"input_quantizer must be a name, a callable or None, got {type(input_quantizer).__name__}"
    )
  if binarize_inputs:
    if input_quantizer not in (None, sign_ste):
      raise ValueError(
        "binarize_inputs=True is input_quantizer='ste_sign'; give one of them, not "
        f"input_quantizer={input_quantizer!r} too"
      )
    return sign_ste
  return input_quantizer


@dataclasses.dataclass(frozen=True)
class _BinaryOp:
  """``dot_general``/``conv_general_dilated`` with quantized operands.

  A frozen dataclass rather than a closure: layers built alike compare equal,
  so their graphdefs match (``nnx.jit`` caching, stacking layers for scan).
  Projections compare by value, so this holds for ternary and m-bit
  quantizers too.
  """

  op: Callable[..., Array]
  # A Projection (quantize_ste), a callable kernel -> kernel, or None (full precision).
  kernel_quantizer: Any
  # A callable (sign_ste for binarized inputs) or None.
  input_quantizer: Any = None
  # The kernel arrives multiplied by a mask (nnx.Conv's ``mask``): its zeros stay zero.
  masked: bool = False
  # Set by lab_optax.nnx.binarize_model: a lab_optax optimizer keeps this kernel
  # on the quantizer's level set, so it is used as it is, without quantize_ste's
  # check (which reads the kernel and copies it on every forward pass).
  kernel_binarized: bool = False

  @property
  def binarize_kernel(self) -> bool:
    return self.kernel_quantizer is not None

  @property
  def binarize_inputs(self) -> bool:
    return self.input_quantizer is not None

  def __call__(self, lhs, rhs, *args, **kwargs):
    if self.input_quantizer is not None:
      lhs = self.input_quantizer(lhs)
    quantizer = self.kernel_quantizer
    if quantizer is not None and not self.kernel_binarized:
      if isinstance(quantizer, projections.Projection):
        rhs = quantize_ste(rhs, quantizer, masked=self.masked)
      else:
        rhs = quantizer(rhs)
    return self.op(lhs, rhs, *args, **kwargs)


def _op_name(layer: nnx.Module) -> str:
  return "dot_general" if isinstance(layer, nnx.Linear) else "conv_general_dilated"


def _mark_kernel_binarized(layer: nnx.Module, projection: projections.Projection | None = None):
  """Lets a quantized layer use its kernel as it is: a lab_optax optimizer keeps it quantized.

  With ``projection`` (the optimizer's), it also becomes the layer's kernel quantizer.
  """
  name = _op_name(layer)
  changes: dict[str, Any] = {"kernel_binarized": True}
  if projection is not None:
    changes["kernel_quantizer"] = projection
    layer.kernel_quantizer = projection
  setattr(layer, name, dataclasses.replace(getattr(layer, name), **changes))


def _as_binary_param(variable: nnx.Param, binarize_kernel: bool) -> nnx.Param:
  if not binarize_kernel:
    return variable
  return BinaryParam(variable.get_value(), **variable.get_metadata())


def _packed_inputs(layer: nnx.Module, inputs: Array) -> tuple[Array, bool]:
  """The inputs of a packed layer's product and whether it is the XNOR one (sign inputs)."""
  if layer.input_quantizer is sign_ste:
    return inputs, True
  if layer.input_quantizer is not None:
    inputs = layer.input_quantizer(inputs)
  return inputs, False


class BinaryLinear(nnx.Linear):
  """A quantized ``nnx.Linear``: ``y = input_quantizer(x) @ kernel_quantizer(kernel) + bias``.

  Binary by default. With :func:`lab_optax.lab` (or ``bwn``, ``binary_connect``)
  the kernel param already holds ``alpha * sign(latent)``: the forward pass
  uses it unchanged and the optimizer's alpha is kept. With any other
  optimizer (plain ``optax.adam``) the layer binarizes the kernel itself with
  ``alpha = mean(|w|)`` and a straight-through identity gradient, which is BWN
  training.

  ``kernel_quantizer`` chooses another level set, as Larq's quantized layers
  do: with ``kernel_quantizer="lat"`` (or any
  :class:`~lab_optax.projections.TernaryProjection`) a ternary kernel kept by
  :func:`lab_optax.lat` is used as it is, and with ``optax.adam`` the layer
  ternarizes the kernel itself (the L2-optimal ternary projection) with a
  straight-through gradient; likewise ``"laq"`` or an
  :class:`~lab_optax.projections.MbitProjection` for m-bit kernels. With a
  lab_optax optimizer, :func:`lab_optax.nnx.binarize_model` sets the layer's
  quantizer to the optimizer's projection, whatever it was.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLinear
    >>> layer = BinaryLinear(3, 4, rngs=nnx.Rngs(0))
    >>> type(layer.kernel).__name__, type(layer.bias).__name__
    ('BinaryParam', 'Param')
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)
    >>> ternary = BinaryLinear(3, 4, kernel_quantizer="lat", rngs=nnx.Rngs(0))
    >>> ternary.kernel_quantizer  # as lab_optax.lat's
    TernaryProjection(solver='approximate', scales=1)

  Args:
    in_features: the number of input features.
    out_features: the number of output features.
    use_bias: whether to add a bias to the output.
    binarize_kernel: quantize the kernel (``False`` gives a full-precision
      ``nnx.Linear`` with the paper's initializer and a plain ``nnx.Param``,
      as ``kernel_quantizer=None``).
    binarize_inputs: binarize the inputs with :func:`lab_optax.sign_ste`
      (LAB2, BNN, XNOR), as ``input_quantizer="ste_sign"``. Never set it on a
      network's first layer.
    kernel_quantizer: how the forward pass quantizes the kernel: a
      :class:`lab_optax.projections.Projection` (a kernel on its level set is
      used as it is, any other is quantized with the method's own rule and a
      straight-through gradient: :func:`lab_optax.quantize_ste`), a name of
      :data:`KERNEL_QUANTIZERS` (the optimizers' names: ``"bwn"``, the
      default, ``"lab"``, ``"binary_connect"``, ``"lat"``, ``"laq"``,
      ``"twn"``, ``"absmean_ternary"``), a callable ``kernel -> kernel`` (used
      as it is), or ``None`` (full precision).
    input_quantizer: how the inputs are quantized: ``"ste_sign"``
      (:func:`lab_optax.sign_ste`), a callable, or ``None`` (real inputs).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers.
    precision: numerical precision of the computation.
    kernel_init: initializer of the kernel (default: the paper's
      U(+-sqrt(1.5 / (fan_in + fan_out)))).
    bias_init: initializer of the bias.
    dot_general: dot product function.
    promote_dtype: function to promote the dtype of the arrays.
    preferred_element_type: output dtype of the dot product.
    rngs: rng key.
    kernel_metadata: metadata of the kernel param.
    bias_metadata: metadata of the bias param.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    binarize_kernel: bool = True,
    binarize_inputs: bool = False,
    kernel_quantizer: KernelQuantizer = "bwn",
    input_quantizer: InputQuantizer = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    dot_general: Callable[..., Array] = jax.lax.dot_general,
    promote_dtype: Callable = dtypes.promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    kernel_quantizer = _kernel_quantizer(kernel_quantizer, binarize_kernel)
    input_quantizer = _input_quantizer(input_quantizer, binarize_inputs)
    super().__init__(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      dot_general=_BinaryOp(dot_general, kernel_quantizer, input_quantizer),
      promote_dtype=promote_dtype,
      preferred_element_type=preferred_element_type,
      rngs=rngs,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
    )
    self.kernel = _as_binary_param(self.kernel, kernel_quantizer is not None)
    self.kernel_quantizer = kernel_quantizer
    self.input_quantizer = input_quantizer
    self.binarize_kernel = kernel_quantizer is not None
    self.binarize_inputs = input_quantizer is not None

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    """``y = input_quantizer(x) @ kernel_quantizer(kernel) + bias``; packed kernels run packed inference."""
    kernel = self.kernel.get_value()
    if not packing.is_packed(kernel):
      return super().__call__(inputs, out_sharding)
    inputs, xnor = _packed_inputs(self, inputs)
    inputs = _inference_dtype(inputs, self.dtype, kernel, self.bias)
    if xnor:
      y = packing.xnor_dense(inputs, kernel)
    else:
      y = packing.binary_dense(inputs, kernel, precision=self.precision)
    return _add_bias(y, self.bias)


def _inference_dtype(
  inputs: Array, dtype: Dtype | None, kernel: packing.Packed, bias: nnx.Param | None
) -> Array:
  """The inputs in the dtype the float layer computes in (``promote_dtype``'s choice)."""
  inputs = jnp.asarray(inputs)
  if dtype is None:
    operands = [inputs.dtype, jnp.dtype(kernel.dtype)]
    if bias is not None:
      operands.append(jnp.asarray(bias.get_value()).dtype)
    dtype = jnp.result_type(*operands)
  return inputs.astype(dtype)


def _add_bias(y: Array, bias: nnx.Param | None) -> Array:
  if bias is None:
    return y
  return y + jnp.asarray(bias.get_value(), y.dtype)


class BinaryConv(nnx.Conv):
  """A quantized ``nnx.Conv``: ``y = conv(input_quantizer(x), kernel_quantizer(kernel)) + bias``.

  Mirrors ``nnx.Conv`` (NHWC inputs; kernel of shape
  ``kernel_size + (in_features // feature_group_count, out_features)``) and
  adds ``kernel_quantizer`` and ``input_quantizer`` (or ``binarize_kernel``
  and ``binarize_inputs``), as :class:`BinaryLinear`; the default kernel
  initializer is the paper's. With lab_optax's optimizers the kernel is used
  as the optimizer quantized it; with any other optimizer the layer trains
  with the quantizer's own rule (BWN by default).

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryConv
    >>> layer = BinaryConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16, 16, 3))).shape
    (2, 16, 16, 8)

  Args:
    in_features: number of input channels.
    out_features: number of output channels (filters).
    kernel_size: shape of the convolutional window.
    strides: inter-window strides.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'CAUSAL'`` or explicit
      pairs, as ``nnx.Conv``; packed inference takes ``'SAME'``, ``'VALID'`` and
      explicit pairs.
    input_dilation: dilation of the inputs.
    kernel_dilation: dilation of the kernel (atrous convolution).
    feature_group_count: number of feature groups (grouped convolution).
    use_bias: whether to add a bias.
    binarize_kernel: quantize the kernel (``False``: a full-precision conv).
    binarize_inputs: binarize the inputs with :func:`lab_optax.sign_ste`
      (LAB2, BNN, XNOR). Zero padding stays zero, as in the float conv.
    kernel_quantizer: as :class:`BinaryLinear`'s (``"bwn"`` by default).
    input_quantizer: as :class:`BinaryLinear`'s (``None`` by default).
    mask: optional mask of the kernel's shape, as ``nnx.Conv``. Masked-out
      taps stay zero and are left out of the layer's own quantization check
      (and of BWN's ``mean(|w|)``); packed inference does not take a mask.
    dtype: the dtype of the computation.
    param_dtype: the dtype of the parameters.
    precision: numerical precision of the computation.
    kernel_init: initializer of the kernel (default: the paper's).
    bias_init: initializer of the bias.
    conv_general_dilated: the convolution function.
    promote_dtype: function to promote the dtype of the arrays.
    preferred_element_type: output dtype of the convolution.
    rngs: rng key.
    kernel_metadata: metadata of the kernel param.
    bias_metadata: metadata of the bias param.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | tuple[int, ...],
    strides: int | tuple[int, ...] | None = 1,
    *,
    padding: Any = "SAME",
    input_dilation: int | tuple[int, ...] | None = 1,
    kernel_dilation: int | tuple[int, ...] | None = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    binarize_kernel: bool = True,
    binarize_inputs: bool = False,
    kernel_quantizer: KernelQuantizer = "bwn",
    input_quantizer: InputQuantizer = None,
    mask: Array | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    conv_general_dilated: Callable[..., Array] = jax.lax.conv_general_dilated,
    promote_dtype: Callable = dtypes.promote_dtype,
    preferred_element_type: Dtype | None = None,
    rngs: nnx.Rngs,
    kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    kernel_quantizer = _kernel_quantizer(kernel_quantizer, binarize_kernel)
    input_quantizer = _input_quantizer(input_quantizer, binarize_inputs)
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      padding=padding,
      input_dilation=input_dilation,
      kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count,
      use_bias=use_bias,
      mask=mask,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      conv_general_dilated=_BinaryOp(
        conv_general_dilated, kernel_quantizer, input_quantizer, masked=mask is not None
      ),
      promote_dtype=promote_dtype,
      preferred_element_type=preferred_element_type,
      rngs=rngs,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
    )
    self.kernel = _as_binary_param(self.kernel, kernel_quantizer is not None)
    self.kernel_quantizer = kernel_quantizer
    self.input_quantizer = input_quantizer
    self.binarize_kernel = kernel_quantizer is not None
    self.binarize_inputs = input_quantizer is not None

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    """``y = conv(input_quantizer(x), kernel_quantizer(kernel)) + bias``; packed kernels run packed inference."""
    kernel = self.kernel.get_value()
    if not packing.is_packed(kernel):
      return super().__call__(inputs, out_sharding)
    if self.mask is not None:
      raise ValueError("a BinaryConv with a kernel mask cannot run from packed weights")
    inputs, xnor = _packed_inputs(self, inputs)
    conv = packing.xnor_conv if xnor else packing.binary_conv
    extra = {} if xnor else {"precision": self.precision}
    y = conv(
      _inference_dtype(inputs, self.dtype, kernel, self.bias),
      kernel,
      strides=1 if self.strides is None else self.strides,
      padding=self.padding,
      input_dilation=1 if self.input_dilation is None else self.input_dilation,
      kernel_dilation=1 if self.kernel_dilation is None else self.kernel_dilation,
      feature_group_count=self.feature_group_count,
      **extra,
    )
    return _add_bias(y, self.bias)


class BinaryLSTMCell(nnx.LSTMCell):
  r"""An LSTM cell with 8 quantized (by default binarized) matrices, each with its own alpha.

  .. math::

      \begin{array}{ll}
      i = \sigma(W_{ii} x + W_{hi} h + b_{hi}) \\
      f = \sigma(W_{if} x + W_{hf} h + b_{hf}) \\
      g = \tanh(W_{ig} x + W_{hg} h + b_{hg}) \\
      o = \sigma(W_{io} x + W_{ho} h + b_{ho}) \\
      c' = f * c + i * g \\
      h' = o * \tanh(c') \quad \text{or, with binary\_activation,} \quad
      h' = o * \mathrm{sign}(c') \\
      \end{array}

  Every :math:`W` is a :class:`BinaryLinear` (``ii, if_, ig, io`` from the
  input, ``hi, hf, hg, ho`` from the hidden state, as in ``nnx.LSTMCell``), so
  the cell holds exactly the paper's 8 binarized matrices. Only the output
  nonlinearity is binarized by ``binary_activation`` (LAB2, BNN, XNOR); the gate
  sigmoids and the candidate tanh stay real. Works inside ``nnx.RNN``.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLSTMCell
    >>> cell = BinaryLSTMCell(5, 8, rngs=nnx.Rngs(0))
    >>> carry = cell.initialize_carry((2, 5), nnx.Rngs(1))
    >>> (c, h), y = cell(carry, jnp.ones((2, 5)))
    >>> y.shape
    (2, 8)

  Args:
    in_features: number of input features.
    hidden_features: number of hidden units.
    binarize_kernel: quantize the 8 matrices (``False``: a full-precision LSTM).
    binary_activation: ``h = o * sign_ste(c)`` instead of ``o * tanh(c)``.
    kernel_quantizer: the 8 matrices' quantizer, as :class:`BinaryLinear`'s
      (``"bwn"`` by default; ``"lat"`` for ternary matrices).
    input_quantizer: the quantizer of ``x`` and ``h`` before the matrices, as
      :class:`BinaryLinear`'s (``None`` by default).
    gate_fn: the gates' activation (sigmoid).
    activation_fn: the candidate's and the output's activation (tanh).
    kernel_init: initializer of the input-to-hidden matrices (paper:
      U(-0.08, 0.08)).
    recurrent_kernel_init: initializer of the hidden-to-hidden matrices (paper:
      U(-0.08, 0.08)).
    bias_init: initializer of the input, candidate and output gate biases.
    forget_bias_init: initializer of the forget gate's bias (paper: ones).
    dtype: the dtype of the computation.
    param_dtype: the dtype of the parameters.
    precision: numerical precision of the matrix products.
    promote_dtype: function to promote the dtype of the arrays.
    rngs: rng key.
  """

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    binarize_kernel: bool = True,
    binary_activation: bool = False,
    kernel_quantizer: KernelQuantizer = "bwn",
    input_quantizer: InputQuantizer = None,
    gate_fn: Callable[..., Any] = nnx.sigmoid,
    activation_fn: Callable[..., Any] = nnx.tanh,
    kernel_init: Initializer = default_lstm_kernel_init,
    recurrent_kernel_init: Initializer = default_lstm_kernel_init,
    bias_init: Initializer = default_bias_init,
    forget_bias_init: Initializer = default_forget_bias_init,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    promote_dtype: Callable = dtypes.promote_dtype,
    rngs: nnx.Rngs,
  ):
    # nnx.LSTMCell hard-codes nnx.Linear for its gates, so the gates are built
    # here; initialize_carry and num_feature_axes are inherited.
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.rngs = nnx.data(None)
    self.carry_init = None
    kernel_quantizer = _kernel_quantizer(kernel_quantizer, binarize_kernel)
    self.kernel_quantizer = kernel_quantizer
    self.input_quantizer = _input_quantizer(input_quantizer, False)
    self.binarize_kernel = kernel_quantizer is not None
    self.binary_activation = binary_activation
    common = dict(
      out_features=hidden_features,
      kernel_quantizer=kernel_quantizer,
      input_quantizer=self.input_quantizer,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      promote_dtype=promote_dtype,
      rngs=rngs,
    )
    dense_i = functools.partial(
      BinaryLinear,
      in_features,
      use_bias=False,
      kernel_init=kernel_init,
      **common,
    )
    dense_h = functools.partial(
      BinaryLinear,
      hidden_features,
      use_bias=True,
      kernel_init=recurrent_kernel_init,
      **common,
    )
    self.ii = dense_i()
    self.if_ = dense_i()
    self.ig = dense_i()
    self.io = dense_i()
    self.hi = dense_h(bias_init=bias_init)
    self.hf = dense_h(bias_init=forget_bias_init)
    self.hg = dense_h(bias_init=bias_init)
    self.ho = dense_h(bias_init=bias_init)

  def __call__(
    self, carry: tuple[Array, Array], inputs: Array
  ) -> tuple[tuple[Array, Array], Array]:
    """One step: ``((c, h), x) -> ((c', h'), h')``."""
    c, h = carry
    i = self.gate_fn(self.ii(inputs) + self.hi(h))
    f = self.gate_fn(self.if_(inputs) + self.hf(h))
    g = self.activation_fn(self.ig(inputs) + self.hg(h))
    o = self.gate_fn(self.io(inputs) + self.ho(h))
    new_c = f * c + i * g
    out = sign_ste(new_c) if self.binary_activation else self.activation_fn(new_c)
    new_h = o * out
    return (new_c, new_h), new_h

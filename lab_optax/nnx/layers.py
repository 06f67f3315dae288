"""Binary Flax NNX layers: ``BinaryLinear``, ``BinaryConv`` and ``BinaryLSTMCell``.

Each layer mirrors its ``flax.nnx`` counterpart (same signature, same state
layout) and computes::

  output = activation(dot(input_quantizer(x), binarize_ste(kernel)) + bias)

``binarize_ste`` keeps a kernel that lab_optax's optimizers already binarized
and binarizes any other kernel as BWN; ``input_quantizer`` is
:func:`lab_optax.sign_ste` when the inputs are binarized (LAB2, BNN, XNOR) and
the identity otherwise. Kernels are :class:`BinaryParam` so that a model's
binary weights can be selected with an nnx filter; biases are plain
``nnx.Param``.

After :func:`lab_optax.nnx.pack_model`, a kernel holds a
:class:`lab_optax.PackedBinary` (1 bit per weight and its alpha) and the layer
runs inference from it: ``alpha * (x @ b)`` for real-valued inputs, and the
exact XNOR-popcount product for binarized inputs.
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

from lab_optax._src import packing
from lab_optax._src.ste import binarize_masked_ste, binarize_ste, sign_ste

Array = jax.Array


class BinaryParam(nnx.Param):
  """An ``nnx.Param`` holding a binarized kernel.

  Select a model's binary weights with ``nnx.state(model, BinaryParam)`` or
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


@dataclasses.dataclass(frozen=True)
class _BinaryOp:
  """``dot_general``/``conv_general_dilated`` with quantized operands.

  A frozen dataclass rather than a closure: layers built alike compare equal,
  so their graphdefs match (``nnx.jit`` caching, stacking layers for scan).
  """

  op: Callable[..., Array]
  binarize_kernel: bool
  binarize_inputs: bool
  # The kernel arrives multiplied by a mask (nnx.Conv's ``mask``): its zeros stay zero.
  masked: bool = False
  # Set by lab_optax.nnx.binarize_model: a lab_optax optimizer keeps this kernel
  # binarized, so it is used as it is, without binarize_ste's check (which
  # reads the kernel and copies it on every forward pass).
  kernel_binarized: bool = False

  def __call__(self, lhs, rhs, *args, **kwargs):
    if self.binarize_inputs:
      lhs = sign_ste(lhs)
    if self.binarize_kernel and not self.kernel_binarized:
      rhs = binarize_masked_ste(rhs) if self.masked else binarize_ste(rhs)
    return self.op(lhs, rhs, *args, **kwargs)


def _mark_kernel_binarized(layer: nnx.Module) -> None:
  """Lets a binary layer use its kernel as it is: a lab_optax optimizer keeps it binarized."""
  name = "dot_general" if isinstance(layer, BinaryLinear) else "conv_general_dilated"
  setattr(layer, name, dataclasses.replace(getattr(layer, name), kernel_binarized=True))


def _as_binary_param(variable: nnx.Param, binarize_kernel: bool) -> nnx.Param:
  if not binarize_kernel:
    return variable
  return BinaryParam(variable.get_value(), **variable.get_metadata())


class BinaryLinear(nnx.Linear):
  """A binarized ``nnx.Linear``: ``y = input_quantizer(x) @ binarize_ste(kernel) + bias``.

  With :func:`lab_optax.lab` (or ``bwn``, ``binary_connect``) the kernel param
  already holds ``alpha * sign(latent)``: the forward pass uses it unchanged
  and the optimizer's alpha is kept. With any other optimizer (plain
  ``optax.adam``) the layer binarizes the kernel itself with
  ``alpha = mean(|w|)`` and a straight-through identity gradient, which is BWN
  training.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lab_optax.nnx import BinaryLinear
    >>> layer = BinaryLinear(3, 4, rngs=nnx.Rngs(0))
    >>> type(layer.kernel).__name__, type(layer.bias).__name__
    ('BinaryParam', 'Param')
    >>> layer(jnp.ones((2, 3))).shape
    (2, 4)

  Args:
    in_features: the number of input features.
    out_features: the number of output features.
    use_bias: whether to add a bias to the output.
    binarize_kernel: binarize the kernel (``False`` gives a full-precision
      ``nnx.Linear`` with the paper's initializer and a plain ``nnx.Param``).
    binarize_inputs: binarize the inputs with :func:`lab_optax.sign_ste`
      (LAB2, BNN, XNOR). Never set it on a network's first layer.
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
    super().__init__(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      dot_general=_BinaryOp(dot_general, binarize_kernel, binarize_inputs),
      promote_dtype=promote_dtype,
      preferred_element_type=preferred_element_type,
      rngs=rngs,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
    )
    self.kernel = _as_binary_param(self.kernel, binarize_kernel)
    self.binarize_kernel = binarize_kernel
    self.binarize_inputs = binarize_inputs

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    """``y = input_quantizer(x) @ binarize_ste(kernel) + bias``; packed kernels run 1-bit inference."""
    kernel = self.kernel.get_value()
    if not isinstance(kernel, packing.PackedBinary):
      return super().__call__(inputs, out_sharding)
    inputs = _inference_dtype(inputs, self.dtype, kernel, self.bias)
    if self.binarize_inputs:
      y = packing.xnor_dense(inputs, kernel)
    else:
      y = packing.binary_dense(inputs, kernel, precision=self.precision)
    return _add_bias(y, self.bias)


def _inference_dtype(
  inputs: Array, dtype: Dtype | None, kernel: packing.PackedBinary, bias: nnx.Param | None
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
  """A binarized ``nnx.Conv``: ``y = conv(input_quantizer(x), binarize_ste(kernel)) + bias``.

  Mirrors ``nnx.Conv`` (NHWC inputs; kernel of shape
  ``kernel_size + (in_features // feature_group_count, out_features)``) and
  adds ``binarize_kernel`` and ``binarize_inputs``, as :class:`BinaryLinear`;
  the default kernel initializer is the paper's. With lab_optax's optimizers
  the kernel is used as the optimizer binarized it; with any other optimizer
  the layer trains as BWN.

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
    binarize_kernel: binarize the kernel (``False``: a full-precision conv).
    binarize_inputs: binarize the inputs with :func:`lab_optax.sign_ste`
      (LAB2, BNN, XNOR). Zero padding stays zero, as in the float conv.
    mask: optional mask of the kernel's shape, as ``nnx.Conv``. Masked-out
      taps stay zero and are left out of the layer's own binarization (its
      check and ``mean(|w|)``); packed inference does not take a mask.
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
        conv_general_dilated, binarize_kernel, binarize_inputs, masked=mask is not None
      ),
      promote_dtype=promote_dtype,
      preferred_element_type=preferred_element_type,
      rngs=rngs,
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
    )
    self.kernel = _as_binary_param(self.kernel, binarize_kernel)
    self.binarize_kernel = binarize_kernel
    self.binarize_inputs = binarize_inputs

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    """``y = conv(input_quantizer(x), binarize_ste(kernel)) + bias``; packed kernels run 1-bit inference."""
    kernel = self.kernel.get_value()
    if not isinstance(kernel, packing.PackedBinary):
      return super().__call__(inputs, out_sharding)
    if self.mask is not None:
      raise ValueError("a BinaryConv with a kernel mask cannot run from packed weights")
    conv = packing.xnor_conv if self.binarize_inputs else packing.binary_conv
    extra = {} if self.binarize_inputs else {"precision": self.precision}
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
  r"""An LSTM cell with 8 binarized matrices, each with its own alpha.

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
    binarize_kernel: binarize the 8 matrices (``False``: a full-precision LSTM).
    binary_activation: ``h = o * sign_ste(c)`` instead of ``o * tanh(c)``.
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
    self.binarize_kernel = binarize_kernel
    self.binary_activation = binary_activation
    common = dict(
      out_features=hidden_features,
      binarize_kernel=binarize_kernel,
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

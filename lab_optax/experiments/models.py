"""The paper's networks and methods, built from lab_optax's NNX layers.

Hou, Yao and Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017
(arXiv:1611.01600): the methods compared and the networks of Section 4
(Tables 1 and 2 for the feedforward nets, Tables 3 and 4 for the LSTM), and
the follow-up's ternary and m-bit methods (Hou and Kwok, "Loss-aware Weight
Quantization of Deep Networks", ICLR 2018: LAT and LAQ, beside TWN and BitNet
b1.58's absmean), which quantize the weights only.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lab_optax
from lab_optax import projections
from lab_optax.nnx import (
  BinaryConv,
  BinaryLinear,
  BinaryLSTMCell,
  fold_batch_norm,
  lstm_kernel_init,
)
from lab_optax.nnx.layers import KernelQuantizer


@dataclasses.dataclass(frozen=True)
class Method:
  """One column of a comparison: how weights and activations are quantized, and by what.

  The paper's seven (:data:`PAPER_METHODS`) binarize; the follow-up's LAT and
  LAQ and their baselines TWN and absmean ternarize or quantize to m bits, with
  full-precision activations.
  """

  name: str  # Command-line name.
  label: str  # Name in tables and plots.
  binary_weights: bool  # Quantized (binary, ternary or m-bit) weights.
  binary_activations: bool
  optimizer: Callable[..., optax.GradientTransformation] | None  # None: full precision Adam.
  # The layers' kernel quantizer: the optimizer's projection, so that a kernel the optimizer
  # keeps ternary or m-bit is used as it is (lab_optax.nnx.binarize_model sets it too).
  kernel_quantizer: KernelQuantizer = "bwn"
  description: str = ""  # One line, for the command line's help.

  def make_optimizer(
    self, learning_rate: optax.ScalarOrSchedule, model: nnx.Module, grad_clip: float | None = None
  ) -> optax.GradientTransformation:
    """Adam (FP) or the lab_optax transformation, with optional elementwise gradient clipping."""
    if self.optimizer is None:
      tx = optax.adam(learning_rate)
    else:
      tx = self.optimizer(learning_rate, mask=lab_optax.nnx.binary_mask(model))
    if grad_clip is not None:
      tx = optax.chain(optax.clip(grad_clip), tx)
    return tx

  def layer_options(self) -> dict[str, Any]:
    """The keyword arguments that make a quantized layer of this method's weights."""
    return {
      "binarize_kernel": self.binary_weights,
      "kernel_quantizer": self.kernel_quantizer if self.binary_weights else None,
    }


#: The LAB paper's seven methods, in its tables' order: the command line's default.
PAPER_METHODS = ("fp", "bc", "bwn", "lab", "bnn", "xnor", "lab2")
#: The bit widths of ``laqN`` and ``laqN-log`` (lab_optax.laq's).
LAQ_BITS = range(2, 9)


def _lat(name: str, label: str, solver: str, scales: int, description: str) -> Method:
  optimizer = functools.partial(lab_optax.lat, solver=solver, scales=scales)
  # lab_optax.lat's projection: its default rounds (0) included.
  projection = projections.TernaryProjection(solver, scales, rounds=0)
  return Method(name, label, True, False, optimizer, projection, description)


def _laq(bits: int, levels: str) -> Method:
  name = f"laq{bits}" + ("-log" if levels == "log" else "")
  optimizer = functools.partial(lab_optax.laq, bits=bits, levels=levels)
  projection = projections.MbitProjection(bits, levels)  # lab_optax.laq's, rounds=10
  kind = "logarithmic" if levels == "log" else "linear"
  description = f"LAQ, {bits}-bit weights on {kind} levels (lab_optax.laq)"
  return Method(name, f"LAQ{bits} ({levels})", True, False, optimizer, projection, description)


METHODS: dict[str, Method] = {
  m.name: m
  for m in (
    Method("fp", "FP", False, False, None, None, "full precision (Adam)"),
    Method(
      "bc", "BinaryConnect", True, False, lab_optax.binary_connect,
      description="BinaryConnect: sign(w), alpha = 1",
    ),
    Method("bwn", "BWN", True, False, lab_optax.bwn, description="BWN: alpha = mean|w|"),
    Method("lab", "LAB", True, False, lab_optax.lab, description="loss-aware binarization"),
    Method(
      "bnn", "BNN", True, True, lab_optax.binary_connect,
      description="BinaryConnect's weights and binary activations",
    ),
    Method(
      "xnor", "XNOR", True, True, lab_optax.bwn,
      description="BWN's weights and binary activations",
    ),
    Method(
      "lab2", "LAB2", True, True, lab_optax.lab,
      description="LAB's weights and binary activations (LAB2: its 2 is the binary activations)",
    ),
    Method(
      "twn", "TWN", True, False, lab_optax.twn, projections.TWNProjection(),
      "ternary weight networks: Delta = 0.7 mean|w| (lab_optax.twn)",
    ),
    Method(
      "absmean", "absmean", True, False, lab_optax.absmean_ternary,
      projections.AbsmeanProjection(),
      "BitNet b1.58's absmean ternary weights (lab_optax.absmean_ternary)",
    ),
    _lat("lat", "LATa", "approximate", 1, "loss-aware ternary weights (lab_optax.lat, LATa)"),
    _lat("lat-exact", "LATe", "exact", 1, "LAT with the exact solver (LATe)"),
    _lat(
      "lat2", "LAT2a", "approximate", 2,
      "LAT with two scales alpha+, alpha- (LAT2a: its 2 is two scales, not lab2's activations)",
    ),
    _lat("lat2-exact", "LAT2e", "exact", 2, "LAT2 with the exact solver (LAT2e)"),
    *(_laq(bits, levels) for bits in LAQ_BITS for levels in ("linear", "log")),
  )
}  # fmt: skip


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # The authors' code: running statistics with momentum 0.9, epsilon 1e-4.
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-4, rngs=rngs)


class MLP(nnx.Module):
  """784FC-2048FC-2048FC-2048FC-10 of Table 1: batch norm after every layer, the output's too.

  Hidden activations are ReLU, or sign (through the next layer's
  ``binarize_inputs``) for methods with binary activations. The network input
  and output are never binarized.
  """

  def __init__(
    self,
    in_features: int,
    num_classes: int,
    *,
    hidden: int = 2048,
    depth: int = 3,
    method: Method,
    rngs: nnx.Rngs,
  ):
    sizes = [in_features] + [hidden] * depth + [num_classes]
    self.binary_activations = method.binary_activations
    self.layers = nnx.List(
      [
        BinaryLinear(
          n_in,
          n_out,
          use_bias=False,  # the batch norm that follows has the bias
          **method.layer_options(),
          binarize_inputs=method.binary_activations and i > 0,
          rngs=rngs,
        )
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))
      ]
    )
    self.norms = nnx.List([_batch_norm(n, rngs) for n in sizes[1:]])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    last = len(self.layers) - 1
    for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
      x = layer(x)
      if norm is not None:
        x = norm(x)
      if i < last and not self.binary_activations:
        x = nnx.relu(x)
    return x

  def fold_batch_norm(self) -> "MLP":
    """Folds every batch norm into the layer before it, in place, for inference.

    Each layer becomes ``lab_optax.nnx.fold_batch_norm(layer, norm)`` and each
    norm ``None``: 1 bit per weight and two floats per unit once packed. Call
    it on a trained model, before ``lab_optax.nnx.pack_model``; the outputs are
    those of ``model.eval()`` up to float rounding.

    Returns:
      The model, for chaining.
    """
    for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
      if norm is not None:
        self.layers[i] = fold_batch_norm(layer, norm)
        self.norms[i] = None
    return self


class VGG(nnx.Module):
  """(2xK C3)-MP2-(2x2K C3)-MP2-(2x4K C3)-MP2-(2x1024FC)-10 of Tables 1 and 2.

  ``width`` is K: 128 for the paper's CIFAR-10 net, 64 for its SVHN net, and
  16/32/64/128 in Table 2. Batch norm follows every layer; 3x3 convolutions
  with 'SAME' padding; max pooling before the batch norm, as in BinaryNet.
  """

  def __init__(
    self,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width: int = 128,
    fc: int = 1024,
    method: Method,
    rngs: nnx.Rngs,
  ):
    height, wide, channels = input_shape
    if height % 8 or wide % 8:
      raise ValueError(f"VGG needs image sides divisible by 8, got {input_shape}")
    self.binary_activations = method.binary_activations
    filters = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    convs, n_in = [], channels
    for i, n_out in enumerate(filters):
      convs.append(
        BinaryConv(
          n_in,
          n_out,
          (3, 3),
          use_bias=False,
          **method.layer_options(),
          binarize_inputs=method.binary_activations and i > 0,
          rngs=rngs,
        )
      )
      n_in = n_out
    self.convs = nnx.List(convs)
    flat = (height // 8) * (wide // 8) * filters[-1]
    sizes = [flat, fc, fc, num_classes]
    self.dense = nnx.List(
      [
        BinaryLinear(
          a,
          b,
          use_bias=False,
          **method.layer_options(),
          binarize_inputs=method.binary_activations,
          rngs=rngs,
        )
        for a, b in zip(sizes[:-1], sizes[1:])
      ]
    )
    self.norms = nnx.List([_batch_norm(n, rngs) for n in filters + sizes[1:]])

  def _activate(self, x: jax.Array) -> jax.Array:
    return x if self.binary_activations else nnx.relu(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    norms = iter(self.norms)
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i % 2 == 1:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      x = self._activate(next(norms)(x))
    x = x.reshape(x.shape[0], -1)
    last = len(self.dense) - 1
    for i, layer in enumerate(self.dense):
      x = next(norms)(layer(x))
      if i < last:
        x = self._activate(x)
    return x


class CharLSTM(nnx.Module):
  """The character model of Tables 3 and 4: one binarized LSTM layer and a full-precision softmax.

  Inputs are one-hot characters; the 8 LSTM matrices are binarized (each with
  its own alpha), the softmax layer stays full precision. Methods with binary
  activations binarize the cell output: ``h = o * sign(c)``.
  """

  def __init__(self, vocab_size: int, hidden: int = 512, *, method: Method, rngs: nnx.Rngs):
    self.vocab_size = vocab_size
    self.cell = BinaryLSTMCell(
      vocab_size,
      hidden,
      **method.layer_options(),
      binary_activation=method.binary_activations,
      rngs=rngs,
    )
    self.rnn = nnx.RNN(self.cell)
    self.out = nnx.Linear(hidden, vocab_size, kernel_init=lstm_kernel_init(), rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """``(B, T)`` character ids -> ``(B, T, vocab_size)`` logits, from a zero state."""
    x = jax.nn.one_hot(ids, self.vocab_size, dtype=jnp.float32)
    return self.out(self.rnn(x))


def squared_hinge(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """The paper's loss: ``mean(max(0, 1 - y * o) ** 2)`` with one-vs-all targets ``y`` in {-1, +1}."""
  y = 2.0 * jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype) - 1.0
  return jnp.mean(jnp.square(jnp.maximum(0.0, 1.0 - y * outputs)))

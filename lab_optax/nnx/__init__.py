"""Flax NNX quantized layers and the helpers that tie a model to lab_optax's optimizers."""

from lab_optax.nnx.layers import (
  INPUT_QUANTIZERS,
  KERNEL_QUANTIZERS,
  BinaryConv,
  BinaryLinear,
  BinaryLSTMCell,
  BinaryParam,
  lstm_kernel_init,
  paper_kernel_init,
)
from lab_optax.nnx.model import (
  binarize_model,
  binary_mask,
  fold_batch_norm,
  pack_model,
  unpack_model,
)
from lab_optax.nnx.summary import LayerSummary, ModelSummary, summary

__all__ = (
  "INPUT_QUANTIZERS",
  "KERNEL_QUANTIZERS",
  "BinaryConv",
  "BinaryLSTMCell",
  "BinaryLinear",
  "BinaryParam",
  "LayerSummary",
  "ModelSummary",
  "binarize_model",
  "binary_mask",
  "fold_batch_norm",
  "lstm_kernel_init",
  "pack_model",
  "paper_kernel_init",
  "summary",
  "unpack_model",
)

"""lab_optax: Loss-aware Binarization (Hou, Yao and Kwok, ICLR 2017) for optax and Flax."""

from lab_optax import nnx, projections
from lab_optax._src.masks import default_mask
from lab_optax._src.metrics import flip_ratio
from lab_optax._src.packing import (
  PackedBinary,
  binary_conv,
  binary_dense,
  load_packed,
  pack,
  pack_bits,
  save_packed,
  unpack,
  xnor_conv,
  xnor_dense,
  xnor_matmul,
)
from lab_optax._src.projections import binary_sign, proximal_binarize
from lab_optax._src.ste import binarize_ste, sign_ste
from lab_optax._src.transform import (
  ProjectedAdamState,
  binarize_params,
  binary_connect,
  bwn,
  lab,
  latent_weights,
  projected_adam,
  quantize_params,
)
from lab_optax.nnx.summary import summary

__version__ = "0.1.0"

__all__ = (
  "PackedBinary",
  "ProjectedAdamState",
  "binarize_params",
  "binarize_ste",
  "binary_connect",
  "binary_conv",
  "binary_dense",
  "binary_sign",
  "bwn",
  "default_mask",
  "flip_ratio",
  "lab",
  "latent_weights",
  "load_packed",
  "nnx",
  "pack",
  "pack_bits",
  "projected_adam",
  "projections",
  "proximal_binarize",
  "quantize_params",
  "save_packed",
  "sign_ste",
  "summary",
  "unpack",
  "xnor_conv",
  "xnor_dense",
  "xnor_matmul",
)

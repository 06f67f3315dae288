"""lab_optax: Loss-aware Binarization (Hou, Yao and Kwok, ICLR 2017) for optax and Flax."""

from lab_optax import nnx, projections
from lab_optax._src.masks import default_mask
from lab_optax._src.metrics import flip_ratio, sparsity
from lab_optax._src.packing import (
  PackedBinary,
  PackedQuantized,
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
from lab_optax._src.projections import (
  binary_sign,
  proximal_binarize,
  proximal_quantize,
  proximal_ternarize,
)
from lab_optax._src.ste import binarize_ste, quantize_ste, sign_ste
from lab_optax._src.transform import (
  ProjectedAdamState,
  absmean_ternary,
  binarize_params,
  binary_connect,
  bwn,
  lab,
  laq,
  lat,
  latent_weights,
  projected_adam,
  quantize_params,
  twn,
)
from lab_optax.nnx.summary import summary

__version__ = "0.1.0"

__all__ = (
  "PackedBinary",
  "PackedQuantized",
  "ProjectedAdamState",
  "absmean_ternary",
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
  "laq",
  "lat",
  "latent_weights",
  "load_packed",
  "nnx",
  "pack",
  "pack_bits",
  "projected_adam",
  "projections",
  "proximal_binarize",
  "proximal_quantize",
  "proximal_ternarize",
  "quantize_params",
  "quantize_ste",
  "save_packed",
  "sign_ste",
  "sparsity",
  "summary",
  "twn",
  "unpack",
  "xnor_conv",
  "xnor_dense",
  "xnor_matmul",
)

"""lab_optax: Loss-aware Binarization (Hou, Yao and Kwok, ICLR 2017) for optax and Flax."""

from lab_optax import projections
from lab_optax._src.masks import default_mask
from lab_optax._src.metrics import flip_ratio
from lab_optax._src.projections import binary_sign, proximal_binarize
from lab_optax._src.transform import (
  ProjectedAdamState,
  binarize_params,
  binary_connect,
  bwn,
  lab,
  latent_weights,
  projected_adam,
)
from lab_optax._src.ste import binarize_ste, sign_ste
from lab_optax import nnx
from lab_optax.nnx.summary import summary

__version__ = "0.1.0"

__all__ = (
  "ProjectedAdamState",
  "binarize_params",
  "binarize_ste",
  "binary_connect",
  "binary_sign",
  "bwn",
  "default_mask",
  "flip_ratio",
  "lab",
  "latent_weights",
  "nnx",
  "projected_adam",
  "projections",
  "proximal_binarize",
  "sign_ste",
  "summary",
)

"""Projections onto quantized sets, and the scale functions of the binary ones (public module)."""

from lab_optax._src.projections import (
  BinaryProjection,
  Projection,
  ScaleFn,
  binary_connect,
  binary_connect_scale,
  binary_sign,
  bwn,
  bwn_scale,
  lab,
  lab_scale,
  proximal_binarize,
  reduction_axes,
)

__all__ = (
  "BinaryProjection",
  "Projection",
  "ScaleFn",
  "binary_connect",
  "bwn",
  "lab",
  "binary_connect_scale",
  "binary_sign",
  "bwn_scale",
  "lab_scale",
  "proximal_binarize",
  "reduction_axes",
)

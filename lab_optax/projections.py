"""Projections onto quantized sets, and the scale functions of the binary ones (public module)."""

from lab_optax._src.projections import (
  AbsmeanProjection,
  BinaryProjection,
  MbitProjection,
  Projection,
  ScaleFn,
  TernaryProjection,
  TWNProjection,
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
  "AbsmeanProjection",
  "BinaryProjection",
  "MbitProjection",
  "Projection",
  "ScaleFn",
  "TWNProjection",
  "TernaryProjection",
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

"""Closed-form projections onto the binary set (public module)."""

from lab_optax._src.projections import (
  ScaleFn,
  binary_connect_scale,
  binary_sign,
  bwn_scale,
  lab_scale,
  proximal_binarize,
  reduction_axes,
)

__all__ = (
  "ScaleFn",
  "binary_connect_scale",
  "binary_sign",
  "bwn_scale",
  "lab_scale",
  "proximal_binarize",
  "reduction_axes",
)

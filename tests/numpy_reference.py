"""An independent NumPy (float64) implementation of Algorithm 1 of Hou et al. (2017).

Written from the paper (Hou, Yao and Kwok, "Loss-aware Binarization of Deep
Networks", ICLR 2017, arXiv:1611.01600: Section 3, Algorithm 1 and the closed
form of Theorem 3.1), without looking at lab_optax's code, so that the
transformation can be held against it step by step.
"""

from __future__ import annotations

import numpy as np


def sign0(x):
  return np.where(x >= 0, 1.0, -1.0)


def scale(method, w, d, per_channel=False):
  axis = tuple(range(w.ndim - 1)) if per_channel else None
  if method == "binary_connect":
    return np.ones_like(np.sum(w, axis=axis, keepdims=True))
  if method == "bwn" or d is None:
    return np.mean(np.abs(w), axis=axis, keepdims=True)
  if method == "lab":
    return np.sum(d * np.abs(w), axis=axis, keepdims=True) / np.sum(d, axis=axis, keepdims=True)
  raise ValueError(method)


def adam_moments(opt, k, g, t):
  """Adam's moments of leaf ``k`` after gradient ``g`` at step ``t``, the bias-corrected
  first moment and the curvature ``d = sqrt(v_hat) + eps`` (float64)."""
  g = np.asarray(g, np.float64)
  m = opt.b1 * opt.m[k] + (1 - opt.b1) * g
  v = opt.b2 * opt.v[k] + (1 - opt.b2) * g * g
  return m, v, m / (1 - opt.b1**t), np.sqrt(v / (1 - opt.b2**t)) + opt.eps


class Reference:
  """Algorithm 1 on a dict of named float arrays."""

  def __init__(
    self, method, params, binarized, *, lr, b1=0.9, b2=0.999, eps=1e-8, clip=1.0, per_channel=False
  ):
    self.method, self.lr, self.b1, self.b2, self.eps, self.clip = method, lr, b1, b2, eps, clip
    self.per_channel = per_channel
    self.binarized = set(binarized)
    self.t = 0
    self.latent = {k: np.array(v, np.float64) for k, v in params.items() if k in self.binarized}
    self.m = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    self.v = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.alpha = {}
    for k, w in self.latent.items():  # t = 1 projection: constant d
      self.alpha[k] = scale(method, w, None, per_channel)
      self.params[k] = self.alpha[k] * sign0(w)

  def step(self, grads):
    self.t += 1
    t = self.t
    for k, g in grads.items():
      self.m[k], self.v[k], m_hat, d = adam_moments(self, k, g, t)
      if k in self.binarized:
        w = self.latent[k] - self.lr * m_hat / d
        if self.clip is not None:
          w = np.clip(w, -self.clip, self.clip)
        self.latent[k] = w
        self.alpha[k] = scale(self.method, w, d, self.per_channel)
        self.params[k] = self.alpha[k] * sign0(w)
      else:
        self.params[k] = self.params[k] - self.lr * m_hat / d

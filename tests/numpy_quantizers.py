"""Independent NumPy (float64) references for the ternary and m-bit quantizers.

Written from the papers, not from lab_optax's code (Hou and Kwok, "Loss-aware
Weight Quantization of Deep Networks", ICLR 2018, arXiv:1802.08635; Li and Liu,
"Ternary Weight Networks", 2016, arXiv:1605.04711; Ma et al., "The Era of 1-bit
LLMs", 2024, arXiv:2402.17764, eqs. 9-11): a brute force
over every code vector, a sort-based exact ternary solver that loops over the
groups, and the TWN and absmean formulas. Every function takes 1-D arrays (one
group); the tests loop over channels.
"""

import itertools

import numpy as np


def objective(w, d, codes, alpha_pos, alpha_neg=None):
  """``sum d (q(b) - w)^2`` with ``q(1) = alpha_pos``, ``q(-1) = -alpha_neg``, ``q(b) = alpha b``."""
  w, d, codes = (np.asarray(x, np.float64) for x in (w, d, codes))
  if alpha_neg is None:
    q = float(alpha_pos) * codes
  else:
    q = np.where(codes > 0, float(alpha_pos), np.where(codes < 0, -float(alpha_neg), 0.0))
  return float(np.sum(d * (q - w) ** 2))


def best_alpha(w, d, codes):
  """The least-squares scale of fixed codes, ``max(0, sum(d b w) / sum(d b^2))``."""
  w, d, codes = (np.asarray(x, np.float64) for x in (w, d, codes))
  den = np.sum(d * codes**2)
  return max(0.0, float(np.sum(d * codes * w) / den)) if den > 0 else 0.0


def _all_codes(n):
  return np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=n)))


def brute_force_ternary(w, d, scales=1):
  """The minimum of the objective over all ``3^n`` codes, each with its optimal scale(s)."""
  w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
  b = _all_codes(w.size)  # (3^n, n)
  if scales == 1:
    den = np.sum(d * b * b, axis=1)
    alpha = np.maximum(0.0, np.sum(d * b * w, axis=1) / np.where(den > 0, den, 1.0))
    q = alpha[:, None] * b
  else:
    p, m = (b > 0).astype(float), (b < 0).astype(float)
    dp, dm = np.sum(d * p, axis=1), np.sum(d * m, axis=1)
    ap = np.maximum(0.0, np.sum(d * p * w, axis=1) / np.where(dp > 0, dp, 1.0))
    am = np.maximum(0.0, -np.sum(d * m * w, axis=1) / np.where(dm > 0, dm, 1.0))
    q = ap[:, None] * p - am[:, None] * m
  return float(np.min(np.sum(d * (q - w) ** 2, axis=1)))


def exact_ternary(w, d):
  """Sort-based exact ternary (one scale): ``(codes, alpha, objective)``, all in float64.

  Sorts ``|w|`` once, scores every support size ``k`` (1 to n) by its objective
  ``sum(d w^2) - S_k^2 / T_k`` and keeps the best.
  """
  w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
  order = np.argsort(-np.abs(w), kind="stable")
  s = np.cumsum((d * np.abs(w))[order])
  t = np.cumsum(d[order])
  base = float(np.sum(d * w * w))
  with np.errstate(divide="ignore", invalid="ignore"):
    obj = np.where(t > 0, base - s * s / t, base)
  k = int(np.argmin(obj)) + 1
  codes = np.zeros_like(w)
  codes[order[:k]] = np.sign(w[order[:k]])
  alpha = s[k - 1] / t[k - 1] if t[k - 1] > 0 else 0.0
  return codes, float(alpha), float(obj[k - 1])


def exact_ternary_two_scales(w, d):
  """Two-scale exact ternary: each sign solved by :func:`exact_ternary` on its own weights."""
  w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
  codes, alphas, total = np.zeros_like(w), [], 0.0
  for side in (w > 0, w < 0):
    if side.any():
      c, a, o = exact_ternary(w[side], d[side])
      codes[side] = c
    else:
      a, o = 0.0, 0.0
    alphas.append(a)
    total += o
  return codes, alphas[0], alphas[1], total


def twn(w):
  w = np.asarray(w, np.float64)
  delta = 0.7 * np.mean(np.abs(w))
  keep = np.abs(w) > delta
  alpha = float(np.mean(np.abs(w)[keep])) if keep.any() else 0.0
  return np.sign(w) * keep, alpha


def absmean(w, eps=1e-5):
  w = np.asarray(w, np.float64)
  gamma = float(np.mean(np.abs(w)))
  return np.clip(np.round(w / (gamma + eps)), -1, 1), gamma

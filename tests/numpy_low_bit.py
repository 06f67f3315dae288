"""An independent NumPy (float64) reference of LAT, LAQ, TWN and absmean training.

Written from QUANTIZATION.md and the papers (Hou and Kwok, "Loss-aware Weight
Quantization of Deep Networks", ICLR 2018, arXiv:1802.08635; Li and Liu,
"Ternary Weight Networks", 2016; Ma et al., "The Era of 1-bit LLMs", 2024),
without looking at lab_optax's solvers, so that the optimizers can be held
against it step by step, as ``numpy_reference.py`` does for LAB's Algorithm 1.

The training step is LAB's (Adam moments, ``d = sqrt(v_hat) + eps``, latent
step, clip); only the projection differs. A projection here works on one group
of weights (a 1-D array: the whole tensor, or one output channel) and returns
``(codes, scales, margin)``: the codes, a tuple of one scale (or two: ``alpha+``
then ``alpha-``), and each weight's distance to the nearest decision boundary of
its code, in units of the scale, so that a test compares codes only where a
rounding of the scale cannot flip them.
"""

from __future__ import annotations

import numpy as np
import numpy_quantizers
from numpy_reference import adam_moments

# ------------------------------------------------------------------ level sets


def positive_levels(bits, kind):
  """``0`` and the ``n = 2^(bits-1) - 1`` positive normalized levels, increasing."""
  n = 2 ** (bits - 1) - 1
  if kind == "linear":
    pos = np.arange(1, n + 1, dtype=np.float64) / n
  elif kind == "log":
    pos = 2.0 ** -np.arange(n - 1, -1, -1, dtype=np.float64)  # 2^-(n-1), ..., 1/2, 1
  else:
    raise ValueError(kind)
  return np.concatenate([[0.0], pos])


def nearest_level(x, pos):
  """The nearest of ``pos`` to each ``x`` in ``[0, 1]``; a tie goes to the smaller level."""
  dist = np.abs(np.asarray(x, np.float64)[:, None] - pos[None, :])
  return pos[np.argmin(dist, axis=1)]  # argmin keeps the first, i.e. the smaller, on a tie


def level_margin(x, pos):
  """Distance of each ``x`` in ``[0, 1]`` to the nearest midpoint of consecutive levels."""
  mid = (pos[1:] + pos[:-1]) / 2
  return np.min(np.abs(np.asarray(x, np.float64)[:, None] - mid[None, :]), axis=1)


# ------------------------------------------------------------------ projections of one group


def _safe_ratio(num, den):
  return float(num / den) if den > 0 else 0.0


class LATe:
  """Exact loss-aware ternary projection; ``scales=2`` solves each sign on its own."""

  def __init__(self, scales=1):
    self.scales = scales

  def step(self, w, d, prev_codes):
    del prev_codes
    if self.scales == 1:
      _, alpha, _ = numpy_quantizers.exact_ternary(w, d)
      alphas = (alpha,)
    else:
      _, ap, am, _ = numpy_quantizers.exact_ternary_two_scales(w, d)
      alphas = (ap, am)
    return ternary_codes(w, alphas)

  def first(self, w):  # t = 1: constant d, the L2-optimal ternary projection
    return self.step(w, np.ones_like(w), None)

  def recode(self, w, alphas):
    return ternary_codes(w, alphas)


class LATa:
  """Alternating ternary projection from the previous step's codes (zeros kept).

  ``alpha = sum(|b| d |w|) / sum(|b| d)`` and ``b = sign(w) 1[|w| > alpha / 2]``,
  at most ``rounds`` rounds, stopping once ``alpha`` moves by less than ``tol``.
  """

  def __init__(self, scales=1, rounds=10, tol=1e-6):
    self.scales, self.rounds, self.tol = scales, rounds, tol

  def _side(self, a, d, start):
    support = start
    alpha = _safe_ratio(np.sum(d * a * support), np.sum(d * support))
    for _ in range(self.rounds):
      support = a > alpha / 2
      new = _safe_ratio(np.sum(d * a * support), np.sum(d * support))
      moved = abs(new - alpha)
      alpha = new
      if moved < self.tol:
        break
    return alpha

  def step(self, w, d, prev_codes):
    a, start = np.abs(w), prev_codes != 0
    if self.scales == 1:
      alphas = (self._side(a, d, start),)
    else:
      alphas = tuple(
        self._side(a[side], d[side], start[side]) if side.any() else 0.0 for side in (w > 0, w < 0)
      )
    return ternary_codes(w, alphas)

  def first(self, w):
    return LATe(self.scales).first(w)

  def recode(self, w, alphas):
    return ternary_codes(w, alphas)


def ternary_codes(w, alphas):
  """Threshold codes ``sign(w) 1[|w| > alpha / 2]`` and their margins, one or two scales."""
  alpha = alphas[0] if len(alphas) == 1 else np.where(w > 0, alphas[0], alphas[1])
  with np.errstate(divide="ignore", invalid="ignore"):
    x = np.where(alpha > 0, np.abs(w) / alpha, np.inf)
  codes = np.sign(w) * (x > 0.5)
  return codes, alphas, np.abs(x - 0.5)


class LAQ:
  """Alternating m-bit projection, linear or logarithmic levels.

  Codes: the nearest level of ``clip(w / alpha, -1, 1)``; scale: the weighted
  least squares ``alpha = sum(d b w) / sum(d b^2)`` of the codes, starting from the
  previous step's codes; at most ``rounds`` rounds, tolerance ``tol`` on alpha.
  The first projection (constant ``d``, no previous codes) starts from
  ``alpha = max|w|`` (lab_optax's documented start, ``proximal_quantize``).
  """

  def __init__(self, bits=3, kind="linear", rounds=10, tol=1e-6):
    self.pos = positive_levels(bits, kind)
    self.rounds, self.tol = rounds, tol
    self.scales = 1

  def codes_of(self, w, alpha):
    x = np.clip(np.abs(w) / alpha, 0.0, 1.0) if alpha > 0 else np.zeros_like(w)
    return np.sign(w) * nearest_level(x, self.pos), level_margin(x, self.pos)

  def _least_squares(self, w, d, b):
    return _safe_ratio(np.sum(d * b * w), np.sum(d * b * b))

  def _alternate(self, w, d, alpha):
    for _ in range(self.rounds):
      b, _ = self.codes_of(w, alpha)
      new = self._least_squares(w, d, b)
      if new <= 0:  # an empty support: start again from max|w|
        new = float(np.max(np.abs(w)))
      moved = abs(new - alpha)
      alpha = new
      if moved < self.tol:
        break
    codes, margin = self.codes_of(w, alpha)
    return codes, (alpha,), margin

  def step(self, w, d, prev_codes):
    # The warm start keeps the previous levels' magnitudes (zeros kept) with the
    # signs of w, as LATa's start does: a weight that changed sign does not pull
    # alpha down (QUANTIZATION.md does not say which signs; this start is better).
    alpha = self._least_squares(w, d, np.abs(prev_codes) * np.sign(w))
    if alpha <= 0:
      alpha = float(np.max(np.abs(w)))
    return self._alternate(w, d, alpha)

  def first(self, w):
    return self._alternate(w, np.ones_like(w), float(np.max(np.abs(w))))

  def recode(self, w, alphas):
    codes, margin = self.codes_of(w, alphas[0])
    return codes, alphas, margin


class TWN:
  """``Delta = 0.7 mean|w|``, ``alpha = mean(|w| over |w| > Delta)``; d is ignored."""

  scales = 1

  def step(self, w, d, prev_codes):
    del d, prev_codes
    codes, alpha = numpy_quantizers.twn(w)
    delta = 0.7 * np.mean(np.abs(w))
    return codes, (alpha,), np.abs(np.abs(w) - delta) / max(alpha, 1e-30)

  def first(self, w):
    return self.step(w, None, None)

  def recode(self, w, alphas):  # the codes do not depend on the scale
    codes, _, margin = self.step(w, None, None)
    return codes, alphas, margin


class Absmean:
  """BitNet b1.58: ``gamma = mean|w|``, codes ``clip(round(w / (gamma + eps)), -1, 1)``."""

  scales = 1

  def __init__(self, eps=1e-5):
    self.eps = eps

  def step(self, w, d, prev_codes):
    del d, prev_codes
    codes, gamma = numpy_quantizers.absmean(w, self.eps)
    return codes, (gamma,), np.abs(np.abs(w) / (gamma + self.eps) - 0.5)

  def first(self, w):
    return self.step(w, None, None)

  def recode(self, w, alphas):  # the codes do not depend on the scale
    codes, _, margin = self.step(w, None, None)
    return codes, alphas, margin


# ------------------------------------------------------------------ training


def dequantize(codes, alphas):
  if len(alphas) == 1:
    return alphas[0] * codes
  return np.where(codes > 0, alphas[0], alphas[1]) * codes


class LowBitReference:
  """LAB's training step with another projection, on a dict of named float arrays.

  ``alpha[k]`` has lab_optax's layout: shape ``()`` per tensor or ``(out,)`` per
  channel, with a leading axis of 2 (``alpha+``, ``alpha-``) for two scales.
  ``margin[k]`` is each weight's distance to its code's decision boundary.
  """

  def __init__(
    self,
    projection,
    params,
    quantized,
    *,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    clip=1.0,
    per_channel=False,
    weight_decay=0.0,
  ):
    self.projection, self.lr, self.b1, self.b2, self.eps = projection, lr, b1, b2, eps
    self.clip, self.per_channel, self.weight_decay = clip, per_channel, weight_decay
    self.quantized = set(quantized)
    self.t = 0
    self.latent = {k: np.array(v, np.float64) for k, v in params.items() if k in self.quantized}
    self.m = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    self.v = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.codes, self.alpha, self.margin = {}, {}, {}
    self.capped = 0  # how many times a scale more than doubled and was capped
    self.clipped = 0  # latent weights at the clip value, summed over steps
    self.zeros = 0  # codes 0 of nonzero latent weights, summed over steps
    for k, w in self.latent.items():
      self._project(k, w, None)

  def _groups(self, x):
    """1-D views of the groups: the whole tensor, or each output channel."""
    if self.per_channel:
      cols = x.reshape(-1, x.shape[-1])
      return [cols[:, j] for j in range(x.shape[-1])]
    return [x.ravel()]

  def _ungroup(self, parts, shape):
    if self.per_channel:
      return np.stack(parts, axis=-1).reshape(shape)
    return parts[0].reshape(shape)

  def _project(self, k, w, d):
    prev = self._groups(self.codes[k]) if k in self.codes else None
    old = self._old_scales(k)
    out = []
    for j, wg in enumerate(self._groups(w)):
      if d is None:
        out.append(self.projection.first(wg))
        continue
      codes, alphas, margin = self.projection.step(wg, self._groups(d)[j], prev[j])
      # lab_optax's documented rule (README): a scale at most doubles per step,
      # so that optax.apply_updates lands exactly on the new level set; the
      # codes are then those of the capped scale.
      capped = tuple(min(a, 2 * o) if o > 0 else a for a, o in zip(alphas, old[j]))
      if capped != tuple(alphas):
        self.capped += 1
        codes, alphas, margin = self.projection.recode(wg, capped)
      out.append((codes, alphas, margin))
    codes = [o[0] for o in out]
    alphas = np.array([o[1] for o in out])  # (groups, scales)
    self.codes[k] = self._ungroup(codes, w.shape)
    self.margin[k] = self._ungroup([o[2] for o in out], w.shape)
    self.params[k] = self._ungroup([dequantize(c, o[1]) for c, o in zip(codes, out)], w.shape)
    alpha = alphas.T  # (scales, groups)
    if not self.per_channel:
      alpha = alpha[:, 0]
    self.alpha[k] = alpha[0] if alpha.shape[0] == 1 else alpha

  def _old_scales(self, k):
    """The previous scales of each group, ``(groups, scales)``."""
    if k not in self.alpha:
      return None
    a = np.asarray(self.alpha[k], np.float64)
    if getattr(self.projection, "scales", 1) == 1:
      a = a[None]
    return a.reshape(a.shape[0], -1).T

  def step(self, grads):
    self.t += 1
    t = self.t
    for k, g in grads.items():
      self.m[k], self.v[k], m_hat, d = adam_moments(self, k, g, t)
      if k in self.quantized:
        w = self.latent[k]
        w = w - self.lr * (m_hat / d + self.weight_decay * w)
        if self.clip is not None:
          w = np.clip(w, -self.clip, self.clip)
        self.latent[k] = w
        self._project(k, w, d)
        self.clipped += int(np.sum(np.abs(w) == self.clip))
        self.zeros += int(np.sum((self.codes[k] == 0) & (w != 0)))
      else:
        p = self.params[k]
        self.params[k] = p - self.lr * (m_hat / d + self.weight_decay * p)

"""Tests of the loss-aware ternary (LAT) and m-bit (LAQ) quantizers and their baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_quantizers as ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab_optax._src import quantizers as q
from lab_optax.projections import reduction_axes

exact = jax.jit(q.ternary_exact, static_argnames=("axis", "scales"))
approx = jax.jit(q.ternary_approximate, static_argnames=("axis", "rounds", "scales"))
mbit = jax.jit(q.mbit_approximate, static_argnames=("axis", "bits", "levels", "rounds"))


def np64(x):
  return np.asarray(x, np.float64)


def channel_objective(w, d, codes, scale, scales):
  """Objective of each channel (last axis) of 2-D arrays, in float64."""
  w, d, codes, scale = np64(w), np64(d), np64(codes), np64(scale)
  out = []
  for j in range(w.shape[1]):
    if scales == 1:
      out.append(ref.objective(w[:, j], d[:, j], codes[:, j], scale[0, j]))
    else:
      out.append(ref.objective(w[:, j], d[:, j], codes[:, j], scale[0, 0, j], scale[1, 0, j]))
  return np.array(out)


def scale_args(scale, scales):
  s = np64(scale).ravel()
  return (s[0],) if scales == 1 else (s[0], s[1])


def random_channels(rng, n, k):
  """``k`` channels of ``n`` weights: Gaussian, nearly equal magnitudes, with zeros, mixed d."""
  w = rng.normal(size=(n, k))
  near = rng.uniform(0.5, 2.0, size=k) * (1 + 1e-2 * rng.normal(size=(n, k)))
  w[:, : k // 3] = (np.sign(rng.normal(size=(n, k))) * near)[:, : k // 3]
  w[rng.uniform(size=(n, k)) < 0.1] = 0.0
  d = np.where(rng.uniform(size=(1, k)) < 0.5, rng.uniform(0.1, 2.0, (n, k)), 1.0)
  return w.astype(np.float32), d.astype(np.float32)


# ----------------------------------------------------------------------------- LATe


@pytest.mark.parametrize("scales", [1, 2])
def test_exact_equals_brute_force_per_channel(scales):
  # 630 channels of 7 rows; channel j holds 1 + j % 7 weights, the rest zero-padded (a zero
  # weight never changes the minimum), so that one compiled shape covers every n <= 7.
  rng = np.random.default_rng(scales)
  k = 630
  w, d = random_channels(rng, 7, k)
  n = 1 + np.arange(k) % 7
  w[np.arange(7)[:, None] >= n] = 0.0
  codes, scale = exact(w, d, axis=reduction_axes(2, True), scales=scales)
  assert codes.shape == w.shape and codes.dtype == jnp.float32
  assert scale.shape == ((1, k) if scales == 1 else (2, 1, k))
  assert set(np.unique(codes)) <= {-1.0, 0.0, 1.0}
  got = channel_objective(w, d, codes, scale, scales)
  want = np.array([ref.brute_force_ternary(w[: n[j], j], d[: n[j], j], scales) for j in range(k)])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # The optimum that keeps every weight nonzero (k = n, missed by the authors' search) is hit.
  real = np.arange(7)[:, None] < n
  all_nonzero = np.all((codes != 0) | ~real, axis=0) & np.all((w != 0) | ~real, axis=0) & (n > 2)
  assert all_nonzero.sum() >= 20


_weight = st.floats(-4.0, 4.0, allow_nan=False, width=32)
_curvature = st.one_of(st.just(0.0), st.floats(0.015625, 10.0, width=32))
_generic = st.lists(st.tuples(_weight, _curvature), min_size=1, max_size=7)
_near_equal = st.builds(
  lambda c, rows: [(s * c * (1 + e), dd) for s, e, dd in rows],
  st.floats(0.1, 3.0),
  st.lists(
    st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(-0.05, 0.05), st.floats(0.1, 2.0)),
    min_size=7,
    max_size=7,  # no padding: the optimum keeping all 7 weights (k = n) is exercised
  ),
)


@settings(max_examples=60)
@given(rows=st.one_of(_generic, _near_equal), scales=st.sampled_from([1, 2]))
def test_exact_equals_brute_force_hypothesis(rows, scales):
  w = np.array([r[0] for r in rows], np.float32)
  d = np.array([r[1] for r in rows], np.float32)
  # Zero-padded to 7 (one compiled shape): a zero weight is never in the optimal support.
  pad = 7 - w.size
  codes, scale = exact(np.pad(w, (0, pad)), np.pad(d, (0, pad), constant_values=0.5), scales=scales)
  assert np.all(np.isfinite(scale)) and np.all(np.asarray(scale) >= 0)
  assert not np.any(codes[w.size :])
  got = ref.objective(w, d, codes[: w.size], *scale_args(scale, scales))
  want = ref.brute_force_ternary(w, d, scales)
  assert got == pytest.approx(want, rel=2e-5, abs=1e-5 * (1 + float(np.sum(d * w * w))))


def test_exact_matches_numpy_reference_large():
  rng = np.random.default_rng(0)
  n = 4096
  w = np.clip(0.05 * rng.standard_t(4, n), -1, 1).astype(np.float32)
  d = (10 ** rng.uniform(-4, -1, n) + 1e-8).astype(np.float32)  # sqrt(v_hat) + eps
  for dd in (d, np.ones(n, np.float32)):
    codes, scale = exact(w, dd)
    ref_codes, ref_alpha, ref_obj = ref.exact_ternary(w, dd)
    got = ref.objective(w, dd, codes, np64(scale)[0])
    assert got == pytest.approx(ref_obj, rel=1e-5)
    assert float(scale[0]) == pytest.approx(ref_alpha, rel=1e-4)
    assert np.mean(np64(codes) != ref_codes) < 1e-3
  # Per channel, one and two scales.
  w2, d2 = w.reshape(512, 8), d.reshape(512, 8)
  axis = reduction_axes(2, True)
  codes, scale = exact(w2, d2, axis=axis)
  codes2, scale2 = exact(w2, d2, axis=axis, scales=2)
  for j in range(8):
    c, a, o = ref.exact_ternary(w2[:, j], d2[:, j])
    assert ref.objective(w2[:, j], d2[:, j], codes[:, j], scale[0, j]) == pytest.approx(o, rel=1e-5)
    assert float(scale[0, j]) == pytest.approx(a, rel=1e-4)
    c, ap, am, o = ref.exact_ternary_two_scales(w2[:, j], d2[:, j])
    got = ref.objective(w2[:, j], d2[:, j], codes2[:, j], scale2[0, 0, j], scale2[1, 0, j])
    assert got == pytest.approx(o, rel=1e-5)
    np.testing.assert_allclose(np64(scale2[:, 0, j]), [ap, am], rtol=1e-4)


def test_objective_is_not_unimodal_in_k():
  w = jnp.array([10.0] + [1.0] * 100)
  ones = np.ones(101)
  s = np.cumsum(np64(w))
  gain = s**2 / np.arange(1, 102)
  np.testing.assert_allclose(gain[[0, 1, 100]], [100, 60.5, 12100 / 101])
  codes, scale = exact(w, None)
  np.testing.assert_array_equal(codes, np.ones(101))  # k* = 101 = n
  assert float(scale[0]) == pytest.approx(110 / 101, rel=1e-6)
  # LATa is local: warm-started from the top-1 support it stays at k = 1.
  c1, a1 = approx(w, None, codes=jnp.array([1.0] + [0.0] * 100))
  assert float(a1[0]) == pytest.approx(10.0)
  assert ref.objective(w, ones, c1, a1[0]) == pytest.approx(100.0)
  assert ref.objective(w, ones, codes, scale[0]) == pytest.approx(200 - 12100 / 101, rel=1e-6)


def rows_of(x, red):
  """``x`` as (kept groups, reduced elements), groups in the order of the kept axes."""
  keep = [a for a in range(x.ndim) if a not in red]
  return np.transpose(np.asarray(x), keep + list(red)).reshape(
    int(np.prod([x.shape[a] for a in keep])), -1
  )


@pytest.mark.parametrize("scales", [1, 2])
def test_exact_general_axes_match_slices(scales):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(3, 5, 4)).astype(np.float32)
  d = rng.uniform(0.1, 2, size=(3, 5, 4)).astype(np.float32)
  for axis, red in [((0, 2), (0, 2)), (-2, (1,))]:
    codes, scale = exact(w, d, axis=axis, scales=scales)
    keepdims = tuple(1 if a in red else w.shape[a] for a in range(3))
    assert scale.shape == (keepdims if scales == 1 else (2, *keepdims))
    sides = [scale] if scales == 1 else [scale[0], scale[1]]
    for g, (wr, dr, cr) in enumerate(zip(rows_of(w, red), rows_of(d, red), rows_of(codes, red))):
      if scales == 1:
        c1, a1, _ = ref.exact_ternary(wr, dr)
        a1 = [a1]
      else:
        c1, ap, am, _ = ref.exact_ternary_two_scales(wr, dr)
        a1 = [ap, am]
      np.testing.assert_array_equal(cr, c1)
      np.testing.assert_allclose([rows_of(s, red)[g, 0] for s in sides], a1, rtol=1e-5)


# ----------------------------------------------------------------------------- LATa


def threshold_codes(w, scale, scales):
  """The ternary rule for given scale(s), in float32 like the solvers."""
  w = np.asarray(w, np.float32)
  s = np.asarray(scale, np.float32)
  if scales == 1:
    return np.sign(w) * (np.abs(w) > s / 2)
  return (w > s[0] / 2).astype(np.float32) - (w < -s[1] / 2)


def lat_alpha(w, d, codes, scales):
  """``sum(|b| d |w|) / sum(|b| d)`` of each side, float64."""
  w, d, codes = np64(w), np64(d), np64(codes)
  sides = [codes != 0] if scales == 1 else [codes > 0, codes < 0]
  return np.array([np.sum(m * d * np.abs(w), axis=0) / np.sum(m * d, axis=0) for m in sides])


@pytest.mark.parametrize("scales", [1, 2])
def test_approximate_is_a_fixed_point_when_converged(scales):
  rng = np.random.default_rng(2)
  w = (rng.normal(size=(256, 4)) * [0.01, 0.1, 1.0, 10.0]).astype(np.float32)
  d = rng.uniform(0.1, 2.0, size=w.shape).astype(np.float32)
  axis = reduction_axes(2, True)
  # tol = 0: the loop runs until the codes stop changing, an exact fixed point.
  codes, scale = approx(w, d, axis, None, 200, 0.0, scales=scales)
  np.testing.assert_array_equal(codes, threshold_codes(w, scale, scales))
  np.testing.assert_allclose(np64(scale).reshape(-1, 4), lat_alpha(w, d, codes, scales), rtol=1e-5)
  # Default tolerance: alpha is the formula of the codes; the codes are the rule of alpha except
  # for weights within tol of the threshold.
  codes, scale = approx(w, d, axis, None, 50, 1e-6, scales=scales)
  np.testing.assert_allclose(np64(scale).reshape(-1, 4), lat_alpha(w, d, codes, scales), rtol=1e-5)
  alpha = np64(scale)[0] if scales == 1 else np.where(w > 0, np64(scale)[0], np64(scale)[1])
  thr = np.abs(np.abs(w) - alpha / 2) > 1e-5
  np.testing.assert_array_equal(
    np.where(thr, codes, 0), np.where(thr, threshold_codes(w, scale, scales), 0)
  )


def test_approximate_one_round_is_one_alternation():
  rng = np.random.default_rng(3)
  w = rng.normal(size=64).astype(np.float32)
  w[:5] = 0.0
  d = rng.uniform(0.1, 2.0, size=64).astype(np.float32)
  codes, scale = approx(w, d, None, None, 1)
  alpha0 = lat_alpha(w, d, np.sign(w), 1)[0]
  expected = np.sign(w) * (np.abs(w) > alpha0 / 2)
  np.testing.assert_array_equal(codes, expected)
  np.testing.assert_allclose(scale, [lat_alpha(w, d, expected, 1)[0]], rtol=1e-6)


def test_approximate_channels_stop_on_their_own():
  # A loose tol makes the small channels stop after one or two rounds while the large ones
  # go on; a channel that kept iterating would move away from its own per-tensor answer.
  rng = np.random.default_rng(4)
  w = (rng.normal(size=(64, 6)) * 10.0 ** np.arange(-2, 4)).astype(np.float32)
  d = rng.uniform(0.1, 2.0, size=w.shape).astype(np.float32)
  codes, scale = approx(w, d, reduction_axes(2, True), None, 10, 0.05)
  for j in range(6):
    c1, s1 = approx(w[:, j], d[:, j], None, None, 10, 0.05)
    np.testing.assert_array_equal(codes[:, j], c1)
    np.testing.assert_allclose(scale[0, j], s1[0], rtol=1e-6)


def test_approximate_warm_start_near_the_optimum():
  rng = np.random.default_rng(5)
  w_prev = rng.normal(size=1024).astype(np.float32)
  w = (w_prev + 0.01 * rng.normal(size=1024)).astype(np.float32)
  d = rng.uniform(0.1, 2.0, size=1024).astype(np.float32)
  codes_prev, _ = exact(w_prev, d)
  codes, scale = approx(w, d, None, codes_prev)
  exact_codes, exact_scale = exact(w, d)
  got = ref.objective(w, d, codes, scale[0])
  best = ref.objective(w, d, exact_codes, exact_scale[0])
  assert best <= got * (1 + 1e-6)
  assert got <= 1.005 * best
  # A zero warm start restarts from sign(w): after convergence, the cold start's answer.
  c0, s0 = approx(w, d, None, jnp.zeros(1024), 50)
  c1, s1 = approx(w, d, None, None, 50)
  np.testing.assert_array_equal(c0, c1)
  np.testing.assert_allclose(s0, s1, rtol=1e-6)


# ----------------------------------------------------------------------------- LAQ


def test_quantize_levels():
  np.testing.assert_allclose(q.quantize_levels(3, "linear"), np.arange(-3, 4) / 3)
  np.testing.assert_array_equal(q.quantize_levels(3, "log"), [-1, -0.5, -0.25, 0, 0.25, 0.5, 1])
  assert q.quantize_levels(4, "log")[8] == 2.0**-6
  for levels in ("linear", "log"):
    np.testing.assert_array_equal(q.quantize_levels(2, levels), [-1, 0, 1])
    for bits in range(2, 9):
      table = q.quantize_levels(bits, levels)
      assert table.size == 2**bits - 1 and np.all(np.diff(table) > 0)
      np.testing.assert_array_equal(table, -table[::-1])
  for bad in (1, 9, 2.5, True):
    with pytest.raises(ValueError, match="bits"):
      q.quantize_levels(bad)
  with pytest.raises(ValueError, match="levels"):
    q.quantize_levels(3, "uniform")


def nearest_level(x, table):
  """Index in ``table`` of the nearest level of each ``x``, and whether it is a near tie."""
  dist = np.abs(np64(x)[..., None] - table)
  two = np.sort(dist, axis=-1)[..., :2]
  return table[np.argmin(dist, axis=-1)], two[..., 1] - two[..., 0] < 1e-5


@pytest.mark.parametrize("bits, levels", [(3, "linear"), (3, "log"), (4, "log")])
def test_mbit_fixed_point_and_least_squares(bits, levels):
  rng = np.random.default_rng(bits)
  w = (rng.normal(size=(500, 2)) * [0.1, 1.0]).astype(np.float32)
  d = rng.uniform(0.1, 2.0, size=w.shape).astype(np.float32)
  table = q.quantize_levels(bits, levels)
  codes, scale = mbit(w, d, reduction_axes(2, True), bits=bits, levels=levels, rounds=100, tol=0.0)
  assert codes.dtype == jnp.float32 and scale.shape == (1, 2)
  table = table.astype(np.float32)
  assert np.all(np.isin(np.asarray(codes), table))
  assert not np.any(np.signbit(np.asarray(codes)) & (np.asarray(codes) == 0))  # no -0.0
  assert len(np.unique(codes)) >= 2 ** (bits - 1)  # most levels in use
  for j in range(2):
    wj, dj, cj, aj = w[:, j], d[:, j], np64(codes[:, j]), float(scale[0, j])
    # The codes are the nearest levels of clip(w / alpha, -1, 1) ...
    nearest, tie = nearest_level(np.clip(wj / np.float32(aj), -1, 1), table)
    np.testing.assert_array_equal(cj[~tie], nearest[~tie])
    # ... and alpha is the least squares for the codes: no nearby alpha does better.
    assert aj == pytest.approx(ref.best_alpha(wj, dj, cj), rel=1e-5)
    obj = ref.objective(wj, dj, cj, aj)
    for f in (0.999, 1.001, 0.99, 1.01):
      assert ref.objective(wj, dj, cj, aj * f) > obj
    # The authors' alpha step sum(|b| d |w|) / sum(|b| d) is worse for the same codes.
    authors = np.sum(np.abs(cj) * dj * np.abs(wj)) / np.sum(np.abs(cj) * dj)
    assert ref.objective(wj, dj, cj, authors) > 1.05 * obj


def test_mbit_two_bits_is_lata():
  rng = np.random.default_rng(6)
  w = rng.normal(size=1024).astype(np.float32)
  d = rng.uniform(0.1, 2.0, size=1024).astype(np.float32)
  start = np.sign(w)
  c1, s1 = mbit(w, d, None, bits=2, codes=start)
  c2, s2 = approx(w, d, None, start)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_allclose(s1, s2, rtol=1e-6)


def test_mbit_cold_start_and_warm_start():
  w = jnp.array([0.9, -0.3, 0.6, 0.0, 0.29])
  codes, scale = mbit(w, None, None, bits=3, rounds=1)  # alpha = max|w| = 0.9, one round
  np.testing.assert_allclose(np64(codes) * 3, [3, -1, 2, 0, 1], atol=1e-6)
  assert float(scale[0]) == pytest.approx(ref.best_alpha(w, np.ones(5), codes), rel=1e-6)
  # A warm start uses |codes| with the signs of w.
  warm, _ = mbit(w, None, None, bits=3, codes=-codes, rounds=1)
  np.testing.assert_array_equal(warm, codes)


# ----------------------------------------------------------------------------- guards


def _all_solvers(w, d, axis, kinds=("exact", "exact2", "approx", "approx2", "mbit", "mbit_log")):
  calls = {
    "exact": lambda: exact(w, d, axis=axis),
    "exact2": lambda: exact(w, d, axis=axis, scales=2),
    "approx": lambda: approx(w, d, axis),
    "approx2": lambda: approx(w, d, axis, scales=2),
    "mbit": lambda: mbit(w, d, axis),
    "mbit_log": lambda: mbit(w, d, axis, levels="log"),
  }
  for kind in kinds:
    yield kind, calls[kind]()


@pytest.mark.parametrize("axis", [None, (0,)])
def test_no_nan_for_zero_weights_or_zero_curvature(axis):
  rng = np.random.default_rng(7)
  w = rng.normal(size=(16, 3)).astype(np.float32)
  zeros, ones = np.zeros_like(w), np.ones_like(w)
  for name, (codes, scale) in _all_solvers(zeros, ones, axis):
    assert np.all(np.asarray(codes) == 0) and np.all(np.asarray(scale) == 0), name
  # d = 0 (eps = 0, no gradient yet) is solved as a constant d.
  for (name, got), (_, want) in zip(_all_solvers(w, zeros, axis), _all_solvers(w, ones, axis)):
    assert np.all(np.isfinite(got[0])) and np.all(np.isfinite(got[1])), name
    assert np.any(np.asarray(got[0]) != 0) and np.all(np.asarray(got[1]) > 0), name
    np.testing.assert_array_equal(got[0], want[0], err_msg=name)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, err_msg=name)
  # d vanishing on part of the tensor (the largest weights).
  d = np.where(np.abs(w) > 1.0, 0.0, 1.0).astype(np.float32)
  for name, (codes, scale) in _all_solvers(w, d, axis):
    assert np.all(np.isfinite(codes)) and np.all(np.isfinite(scale)), name


@pytest.mark.parametrize("axis", [None, (0,)])
def test_two_scales_with_weights_of_one_sign(axis):
  rng = np.random.default_rng(8)
  w = np.abs(rng.normal(size=(16, 3))).astype(np.float32)
  d = rng.uniform(0.1, 2.0, size=w.shape).astype(np.float32)
  for sign, empty, full in ((1.0, 1, 0), (-1.0, 0, 1)):
    for name, (codes, scale) in _all_solvers(sign * w, d, axis, ("exact2", "approx2")):
      assert np.all(np.isfinite(scale)) and np.all(np.asarray(codes) * sign >= 0), name
      assert np.all(np.asarray(scale[empty]) == 0) and np.all(np.asarray(scale[full]) > 0), name
      # With one sign, the two-scale answer is the one-scale answer.
      one = dict(_all_solvers(sign * w, d, axis, (name[:-1],)))[name[:-1]]
      np.testing.assert_array_equal(codes, one[0], err_msg=name)
      np.testing.assert_allclose(scale[full], one[1], rtol=1e-6, err_msg=name)


def test_empty_tensor_and_errors():
  w = jnp.zeros((0, 4))
  for axis, shape in ((None, (1, 1)), ((0,), (1, 4))):
    for fn in (q.ternary_exact, q.ternary_approximate, q.mbit_approximate):
      codes, scale = fn(w, None, axis)
      assert codes.shape == (0, 4) and scale.shape == shape
    codes, scale = q.ternary_exact(w, None, axis, scales=2)
    assert scale.shape == (2, *shape)
  w = jnp.ones((3, 2))
  with pytest.raises(ValueError, match="scales"):
    q.ternary_exact(w, None, scales=3)
  with pytest.raises(ValueError, match="rounds"):
    q.ternary_approximate(w, None, rounds=-1)
  with pytest.raises(ValueError, match="axis"):
    q.ternary_exact(w, None, axis=2)
  with pytest.raises(ValueError, match="broadcast"):
    q.mbit_approximate(w, jnp.ones(3), None)
  with pytest.raises(ValueError, match="two-scale"):
    q.dequantize(w, jnp.ones((3, 1, 1)))


def test_jit_and_bfloat16_inputs():
  rng = np.random.default_rng(9)
  w16 = jnp.asarray(rng.normal(size=(16, 3)), jnp.bfloat16)
  d16 = jnp.asarray(rng.uniform(0.1, 2.0, size=(16, 3)), jnp.bfloat16)
  w_up, d_up = w16.astype(jnp.float32), d16.astype(jnp.float32)
  kinds = ("exact", "approx2", "mbit")
  for (name, got), (_, want) in zip(
    _all_solvers(w16, d16, (0,), kinds), _all_solvers(w_up, d_up, (0,), kinds)
  ):
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32, name
    np.testing.assert_array_equal(got[0], want[0], err_msg=name)
    np.testing.assert_array_equal(got[1], want[1], err_msg=name)
  for fn in (q.twn, q.absmean):
    codes, scale = jax.jit(fn)(w16)
    assert codes.dtype == jnp.float32
    np.testing.assert_array_equal(codes, fn(w_up)[0])


# ----------------------------------------------------------------------------- baselines


def test_twn_and_absmean_match_numpy():
  rng = np.random.default_rng(10)
  w = rng.normal(size=(50, 3)).astype(np.float32)
  for fn, rfn in ((q.twn, ref.twn), (q.absmean, ref.absmean)):
    codes, scale = fn(w)
    rc, rs = rfn(w.ravel())
    np.testing.assert_array_equal(np64(codes).ravel(), rc)
    np.testing.assert_allclose(scale, [[rs]], rtol=1e-6)
    codes, scale = fn(w, reduction_axes(2, True))
    assert scale.shape == (1, 3)
    for j in range(3):
      rc, rs = rfn(w[:, j])
      np.testing.assert_array_equal(codes[:, j], rc)
      np.testing.assert_allclose(scale[0, j], rs, rtol=1e-6)
    codes, scale = fn(np.zeros((4, 3), np.float32))
    assert np.all(np.asarray(codes) == 0) and np.all(np.asarray(scale) == 0)
  # absmean's eps: the paper's gamma + eps.
  codes, _ = q.absmean(jnp.array([1e-6, -1e-6, 0.0]))  # 1e-6 / (6.7e-7 + 1e-5) rounds to 0
  np.testing.assert_array_equal(codes, [0, 0, 0])
  codes, _ = q.absmean(jnp.array([1e-6, -1e-6, 0.0]), eps=0.0)
  np.testing.assert_array_equal(codes, [1, -1, 0])


def test_dequantize():
  codes = jnp.array([[1.0, -1.0], [0.0, 1.0], [-1.0, -1.0]])
  one = jnp.array([[2.0, 3.0]])
  np.testing.assert_array_equal(q.dequantize(codes, one), codes * one)
  two = jnp.array([[[2.0, 3.0]], [[0.5, 0.25]]])
  np.testing.assert_array_equal(q.dequantize(codes, two), [[2, -0.25], [0, 3], [-0.5, -0.25]])

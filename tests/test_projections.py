"""Tests of the closed-form projections (Theorem 3.1)."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lab_optax
from lab_optax import projections


def objective(w_hat, w, d):
  return float(np.sum(d * (w_hat - w) ** 2))


def test_binary_sign_maps_zero_to_plus_one():
  x = jnp.array([-3.0, -0.0, 0.0, 1e-30, 2.0])
  np.testing.assert_array_equal(lab_optax.binary_sign(x), [-1, 1, 1, 1, 1])
  assert lab_optax.binary_sign(x).dtype == x.dtype
  assert lab_optax.binary_sign(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_scales_closed_form():
  w = jnp.array([[0.5, -1.0], [0.0, 2.0]])
  d = jnp.array([[1.0, 3.0], [2.0, 2.0]])
  np.testing.assert_allclose(projections.lab_scale(w, d), [[(0.5 + 3.0 + 0.0 + 4.0) / 8.0]])
  np.testing.assert_allclose(projections.bwn_scale(w), [[3.5 / 4]])
  np.testing.assert_allclose(projections.binary_connect_scale(w), [[1.0]])
  # Per output channel: reduce over all axes but the last.
  axis = projections.reduction_axes(2, per_channel=True)
  np.testing.assert_allclose(projections.lab_scale(w, d, axis), [[0.5 / 3.0, 7.0 / 5.0]])
  np.testing.assert_allclose(projections.bwn_scale(w, None, axis), [[0.25, 1.5]])


def test_lab_scale_falls_back_to_mean_abs_when_d_is_zero():
  w = jnp.array([[0.5, -1.5], [0.25, 0.75]])
  alpha = projections.lab_scale(w, jnp.zeros_like(w))
  assert np.isfinite(alpha).all()
  np.testing.assert_allclose(alpha, [[0.75]])


def test_empty_tensor_gives_zero_scale_without_nan():
  w = jnp.zeros((0, 4))
  for fn in (projections.lab_scale, projections.bwn_scale):
    alpha = fn(w, jnp.zeros_like(w))
    assert alpha.shape == (1, 1) and float(alpha[0, 0]) == 0.0


def test_proximal_binarize_on_a_pytree_jitted():
  key1, key2 = jax.random.split(jax.random.key(0))
  w = {"a": jax.random.normal(key1, (5, 3)), "b": [jax.random.normal(key2, (2, 2, 3))]}
  d = jax.tree.map(lambda x: jnp.abs(x) + 0.1, w)
  out = jax.jit(lab_optax.proximal_binarize)(w, d)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, w)
  for o, x, dd in zip(jax.tree.leaves(out), jax.tree.leaves(w), jax.tree.leaves(d)):
    alpha = np.sum(dd * np.abs(x)) / np.sum(dd)
    np.testing.assert_allclose(o, alpha * np.where(x >= 0, 1.0, -1.0), rtol=1e-6)


def test_proximal_binarize_per_channel():
  w = jnp.array([[1.0, -4.0], [-3.0, 2.0]])
  out = lab_optax.proximal_binarize(w, jnp.ones_like(w), per_channel=True)
  np.testing.assert_allclose(out, [[2.0, -3.0], [-2.0, 3.0]])


def test_proximal_binarize_keeps_dtype():
  w = jnp.array([[0.5, -0.25]], jnp.bfloat16)
  out = lab_optax.proximal_binarize(w, jnp.ones_like(w))
  assert out.dtype == jnp.bfloat16


# XLA flushes subnormal float32 results to zero on CPU, so d * |w| must stay a
# normal number: weights are 0 or at least 1e-30 in magnitude.
weights = hnp.arrays(
  np.float64,
  hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
  elements=st.floats(-3, 3, allow_nan=False, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-30),
)


@settings(max_examples=20, deadline=None)
@given(weights, st.integers(0, 2**31 - 1))
def test_closed_form_beats_other_scaled_sign_vectors(w, seed):
  rng = np.random.default_rng(seed)
  d = rng.uniform(0.01, 10.0, size=w.shape)
  w_hat = np.asarray(
    lab_optax.proximal_binarize(jnp.asarray(w, jnp.float32), jnp.asarray(d, jnp.float32))
  )
  best = objective(w_hat, w, d)
  tol = 1e-4 * (1 + best)
  b = np.where(w >= 0, 1.0, -1.0)
  alpha = float(np.abs(w_hat).max())
  # Other sign vectors at their own optimal (and at random) scales.
  for _ in range(20):
    s = rng.choice([-1.0, 1.0], size=w.shape)
    c_opt = max(np.sum(d * s * w) / np.sum(d), 0.0)
    for c in (c_opt, rng.uniform(0, 3)):
      assert best <= objective(c * s, w, d) + tol
  # alpha minimizes the objective along alpha for b = sign(w).
  for delta in (1e-3, 1e-2, 0.1, 1.0):
    for c in (alpha + delta, max(alpha - delta, 0.0)):
      assert best <= objective(c * b, w, d) + tol


@settings(max_examples=30, deadline=None)
@given(weights)
def test_constant_d_gives_bwn(w):
  w = jnp.asarray(w, jnp.float32)
  np.testing.assert_allclose(
    projections.lab_scale(w, jnp.full_like(w, 0.3)), projections.bwn_scale(w), rtol=1e-5
  )


@pytest.mark.parametrize(
  "fn", [projections.lab_scale, projections.bwn_scale, projections.binary_connect_scale]
)
def test_scales_jit(fn):
  w = jnp.arange(6.0).reshape(2, 3) - 2.5
  np.testing.assert_allclose(jax.jit(fn)(w, jnp.ones_like(w)), fn(w, jnp.ones_like(w)))


def test_lab_scale_broadcasts_d_over_the_whole_tensor():
  w = jnp.array([[0.5, -1.0], [0.0, 2.0]])
  expected = projections.lab_scale(w, jnp.ones_like(w))
  for d in (jnp.float32(3.0), jnp.ones((2, 1)), jnp.full((2,), 0.5)):
    np.testing.assert_allclose(projections.lab_scale(w, d), expected)
  # A row of d weights the columns.
  np.testing.assert_allclose(
    projections.lab_scale(w, jnp.array([1.0, 3.0])), [[(0.5 + 0.0 + 3 * (1.0 + 2.0)) / 8]]
  )
  with pytest.raises(ValueError, match=r"d of shape \(3,\) does not broadcast to w of shape"):
    projections.lab_scale(w, jnp.ones(3))


def test_proximal_binarize_names_bad_leaves():
  with pytest.raises(ValueError, match=r"\['b'\] has dtype int32"):
    lab_optax.proximal_binarize(
      {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2), jnp.int32)}, {"a": 1.0, "b": 1.0}
    )
  with pytest.raises(ValueError, match=r"does not broadcast.*\['a'\]"):
    lab_optax.proximal_binarize({"a": jnp.ones((2, 2))}, {"a": jnp.ones(3)})

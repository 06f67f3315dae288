"""Straight-through estimators."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import lab_optax


def test_sign_ste_forward_values():
  x = jnp.array([-3.0, -1.0, -1e-7, 0.0, -0.0, 1e-7, 1.0, 3.0])
  np.testing.assert_array_equal(lab_optax.sign_ste(x), [-1, -1, -1, 1, 1, 1, 1, 1])
  assert lab_optax.sign_ste(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_sign_ste_gradient_gate_is_inclusive():
  x = jnp.array([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.0001, 4.0])
  g = jax.grad(lambda x: jnp.sum(lab_optax.sign_ste(x) * jnp.arange(1.0, 9.0)))(x)
  np.testing.assert_array_equal(g, [0, 2, 3, 4, 5, 6, 0, 0])
  g_jit = jax.jit(jax.grad(lambda x: lab_optax.sign_ste(x).sum()))(x)
  np.testing.assert_array_equal(g_jit, [0, 1, 1, 1, 1, 1, 0, 0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=20))
def test_sign_ste_vjp_matches_the_gate(values):
  x = jnp.asarray(values, jnp.float32)
  _, vjp = jax.vjp(lab_optax.sign_ste, x)
  (g,) = vjp(jnp.full_like(x, 2.0))
  np.testing.assert_array_equal(g, np.where(np.abs(np.asarray(x)) <= 1, 2.0, 0.0))


def test_binarize_ste_forward_and_identity_gradient():
  k = jnp.array([[0.5, -1.5], [1.0, -0.0], [0.25, 0.75]])
  alpha = np.mean(np.abs(np.asarray(k)))
  np.testing.assert_allclose(lab_optax.binarize_ste(k), alpha * np.array([[1, -1], [1, 1], [1, 1]]))
  g = jax.grad(lambda k: jnp.sum(lab_optax.binarize_ste(k) * jnp.arange(6.0).reshape(3, 2)))(k)
  np.testing.assert_array_equal(g, np.arange(6.0).reshape(3, 2))


def test_binarize_ste_keeps_binarized_kernels_exactly():
  per_tensor = jnp.array([[0.3, -0.3], [-0.3, 0.3]])
  per_channel = jnp.array([[0.3, -0.7], [-0.3, 0.7], [0.3, 0.7]])
  for k in (per_tensor, per_channel):
    np.testing.assert_array_equal(lab_optax.binarize_ste(k), k)
    np.testing.assert_array_equal(jax.jit(lab_optax.binarize_ste)(k), k)
  assert lab_optax.binarize_ste(jnp.zeros((0, 3))).shape == (0, 3)


def test_binarize_ste_binarizes_a_kernel_with_one_weight_per_channel():
  # max == min per channel holds trivially for one row: only one magnitude in all counts.
  kernel = jnp.array([[0.4, -0.2, 0.3]])
  np.testing.assert_allclose(lab_optax.binarize_ste(kernel), [[0.3, -0.3, 0.3]], rtol=1e-6)
  binary = jnp.array([[0.3, -0.3, 0.3]])
  np.testing.assert_array_equal(lab_optax.binarize_ste(binary), binary)
  conv = jnp.array([0.4, -0.2]).reshape(1, 1, 1, 2)  # a 1x1 conv with one input channel
  np.testing.assert_allclose(lab_optax.binarize_ste(conv).ravel(), [0.3, -0.3], rtol=1e-6)

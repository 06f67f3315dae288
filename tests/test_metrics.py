"""flip_ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lab_optax


def test_flip_ratio_counts_sign_changes_of_binarized_leaves_only():
  old = {"w": jnp.array([[1.0, -1.0], [0.0, 2.0]]), "v": -jnp.ones((2, 3)), "b": jnp.ones(4)}
  new = {"w": jnp.array([[-1.0, -1.0], [-0.5, 2.0]]), "v": jnp.ones((2, 3)), "b": -jnp.ones(4)}
  # w flips 2 of 4 (0 -> -0.5 is a flip: sign(0) = +1), v flips 6 of 6; b is not binarized.
  np.testing.assert_allclose(lab_optax.flip_ratio(old, new), 8 / 10)
  mask = {"w": True, "v": False, "b": False}
  np.testing.assert_allclose(jax.jit(lab_optax.flip_ratio, static_argnums=2)(old, new), 0.8)
  np.testing.assert_allclose(lab_optax.flip_ratio(old, new, mask), 0.5)
  assert float(lab_optax.flip_ratio({"b": jnp.ones(3)}, {"b": -jnp.ones(3)})) == 0.0


def test_flip_ratio_as_a_training_metric():
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8)) * 0.1}
  tx = lab_optax.lab(0.05)
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)

  @jax.jit
  def step(params, state, key):
    grads = {"w": jax.random.normal(key, (16, 8))}
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    return new, state, lab_optax.flip_ratio(params, new)

  ratios = []
  for i in range(5):
    params, state, ratio = step(params, state, jax.random.key(i + 1))
    ratios.append(float(ratio))
  assert all(0.0 <= r <= 1.0 for r in ratios) and max(ratios) > 0.0


def test_flip_ratio_rejects_mismatched_trees():
  with pytest.raises(ValueError, match="leaves"):
    lab_optax.flip_ratio({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2)), "x": jnp.ones((2, 2))})

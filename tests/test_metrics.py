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


def test_flip_ratio_counts_moves_between_zero_and_alpha():
  a = 0.5
  old = {"w": jnp.array([[a, 0.0, -a], [0.0, a, a]])}
  # 0 -> a, -a -> 0, a -> -a flip; a new scale alone (a -> 0.7) does not.
  new = {"w": jnp.array([[0.7, 0.7, 0.0], [0.0, -0.7, 0.7]])}
  np.testing.assert_allclose(lab_optax.flip_ratio(old, new), 3 / 6)
  np.testing.assert_allclose(jax.jit(lab_optax.flip_ratio)(old, new), 0.5)
  # Two scales per tensor (LAT2): the codes are the same.
  two = {"w": jnp.array([[0.7, 0.7, 0.0], [0.0, -0.2, 0.7]])}
  np.testing.assert_allclose(lab_optax.flip_ratio(new, two), 0.0)


def test_flip_ratio_counts_level_changes_of_mbit_weights_with_the_projection():
  mbit = lab_optax.projections.MbitProjection(3)  # levels k / 3
  u = 0.25
  old = {"w": jnp.array([[0.0, u, 2 * u], [3 * u, -u, -3 * u]])}
  new = {"w": jnp.array([[0.0, 2 * u, 2 * u], [3 * u, -u, -3 * u]]) * 1.5}  # u -> 2u, new scale
  np.testing.assert_allclose(lab_optax.flip_ratio(old, new), 0.0)  # signs and zeros only
  np.testing.assert_allclose(lab_optax.flip_ratio(old, new, projection=mbit), 1 / 6)
  jitted = jax.jit(lambda a, b: lab_optax.flip_ratio(a, b, projection=mbit))
  np.testing.assert_allclose(jitted(old, new), 1 / 6)


def test_flip_ratio_of_lat_and_laq_training():
  params = {"w": jax.random.normal(jax.random.key(0), (32, 8)) * 0.1}
  for tx, projection in [
    (lab_optax.lat(0.05), None),
    (lab_optax.laq(0.05), lab_optax.projections.MbitProjection(3)),
  ]:
    state = tx.init(params)
    p = lab_optax.quantize_params(params, state)
    updates, state = tx.update({"w": jax.random.normal(jax.random.key(1), (32, 8))}, state, p)
    new = optax.apply_updates(p, updates)
    ratio = float(lab_optax.flip_ratio(p, new, projection=projection))
    # The reference: the codes the optimizer's scales give.
    a_old = np.abs(np.asarray(p["w"])).max()
    a_new = np.abs(np.asarray(new["w"])).max()
    n = 1 if projection is None else 3
    expected = np.mean(np.round(p["w"] / a_old * n) != np.round(new["w"] / a_new * n))
    assert 0 < ratio < 1 and ratio == pytest.approx(expected)


def test_sparsity_is_the_fraction_of_zeros_among_quantized_weights():
  params = {"w": jnp.array([[0.5, 0.0], [-0.5, 0.0]]), "v": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
  np.testing.assert_allclose(lab_optax.sparsity(params), 8 / 10)
  np.testing.assert_allclose(lab_optax.sparsity(params, {"w": True, "v": False, "b": False}), 0.5)
  np.testing.assert_allclose(jax.jit(lab_optax.sparsity)(params), 0.8)
  assert float(lab_optax.sparsity({"b": jnp.zeros(3)})) == 0.0
  w = jax.random.normal(jax.random.key(0), (64, 16))
  tx = lab_optax.lat(0.1)
  ternary = lab_optax.quantize_params({"w": w}, tx.init({"w": w}))
  expected = np.mean(np.asarray(ternary["w"]) == 0)
  assert 0 < expected < 1 and float(lab_optax.sparsity(ternary)) == pytest.approx(expected)

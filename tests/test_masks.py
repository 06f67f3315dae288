"""Masks and bad inputs: mismatched masks, integer and empty leaves, zero curvature, dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lab_optax


def make_params():
  rng = np.random.default_rng(0)
  return {
    "layer": {
      "kernel": jnp.asarray(rng.uniform(-0.5, 0.5, (6, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
    "out": jnp.asarray(rng.uniform(-0.5, 0.5, (4, 3)), jnp.float32),
    "steps": jnp.arange(3, dtype=jnp.int32),
  }


def float_grads(params, seed):
  """Random gradients for floating leaves, zeros for integer ones."""
  rng = np.random.default_rng(seed)

  def one(p):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return jnp.zeros_like(p)
    return jnp.asarray(rng.normal(size=p.shape), p.dtype)

  return jax.tree.map(one, params)


def run(tx, params, steps, grads_fn=float_grads):
  state = jax.jit(tx.init)(params)
  params = jax.jit(lab_optax.binarize_params)(params, state)
  update = jax.jit(tx.update)
  for i in range(steps):
    updates, state = update(grads_fn(params, i), state, params)
    params = jax.jit(optax.apply_updates)(params, updates)
  return params, state


def all_finite(tree):
  return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "mask, path",
  [
    # A params leaf without an entry, at the top and inside a subtree.
    ({"layer": {"kernel": True, "bias": False}, "out": True}, "['steps']"),
    ({"layer": {"kernel": True}, "out": True, "steps": False}, "['layer']['bias']"),
    # An entry without a params leaf.
    (
      {"layer": {"kernel": True, "bias": False}, "out": True, "steps": False, "zz": True},
      "['zz']",
    ),
  ],
)
def test_mask_with_other_structure_names_the_first_mismatching_path(mask, path):
  params = make_params()
  for init in (lab_optax.lab(0.1, mask=mask).init, jax.jit(lab_optax.lab(0.1, mask=mask).init)):
    with pytest.raises(ValueError, match=re.escape(path)):
      init(params)


def test_mask_selecting_an_integer_leaf_names_it():
  mask = {"layer": {"kernel": True, "bias": False}, "out": True, "steps": True}
  with pytest.raises(ValueError, match=re.escape("['steps']") + ".*int32"):
    lab_optax.lab(0.1, mask=mask).init(make_params())


def test_integer_leaves_are_untouched_with_float0_gradients():
  params = make_params()
  tx = lab_optax.lab(0.1)
  state = jax.jit(tx.init)(params)
  params = jax.jit(lab_optax.binarize_params)(params, state)

  def loss(p):
    return jnp.sum(p["layer"]["kernel"] ** 2) + jnp.sum(p["out"]) + jnp.sum(p["layer"]["bias"])

  grads = jax.grad(loss, allow_int=True)(params)
  assert grads["steps"].dtype == jax.dtypes.float0
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert new["steps"].dtype == jnp.int32
  np.testing.assert_array_equal(new["steps"], np.arange(3))
  assert not np.array_equal(new["layer"]["bias"], params["layer"]["bias"])


@pytest.mark.parametrize("inject", [False, True])
def test_zero_eps_and_zero_gradients_give_mean_abs_alpha(inject):
  params = make_params()
  del params["steps"]
  tx = (optax.inject_hyperparams(lab_optax.lab) if inject else lab_optax.lab)(0.1, eps=0.0)
  zeros = lambda p, seed: jax.tree.map(jnp.zeros_like, p)
  new, state = run(tx, params, 3, grads_fn=zeros)  # d = 0 everywhere
  assert all_finite((new, state))
  alpha = optax.tree.get(state, "alpha")
  for name, w in (("kernel", params["layer"]["kernel"]), ("out", params["out"])):
    a = alpha["layer"][name] if name == "kernel" else alpha[name]
    np.testing.assert_allclose(a, np.mean(np.abs(w)), rtol=1e-6)
  np.testing.assert_array_equal(new["layer"]["bias"], params["layer"]["bias"])

  # d = 0 on part of a tensor only: those weights stay, the others move.
  def row_zero(p, seed):
    g = float_grads(p, seed)
    g["out"] = g["out"].at[0].set(0.0)
    return g

  new, state = run(tx, params, 3, grads_fn=row_zero)
  assert all_finite((new, state))
  latent = lab_optax.latent_weights(state)["out"]
  np.testing.assert_array_equal(latent[0], params["out"][0])
  assert not np.array_equal(latent[1:], params["out"][1:])


@pytest.mark.parametrize("per_channel", [False, True])
def test_empty_leaves_give_no_nan(per_channel):
  params = {"empty": jnp.zeros((0, 4)), "kernel": jnp.ones((3, 4)), "bias": jnp.zeros((0,))}
  new, state = run(lab_optax.lab(0.1, per_channel=per_channel), params, 3)
  assert all_finite((new, state))
  assert new["empty"].shape == (0, 4) and new["bias"].shape == (0,)
  assert not isinstance(lab_optax.latent_weights(state)["empty"], optax.MaskedNode)
  np.testing.assert_array_equal(optax.tree.get(state, "alpha")["empty"], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", ["lab", "bwn"])
def test_low_precision_per_channel_keeps_dtype_and_two_values_per_channel(dtype, method):
  params = {"w": (jax.random.normal(jax.random.key(0), (16, 8)) * 0.05).astype(dtype)}
  params, state = run(getattr(lab_optax, method)(0.02, per_channel=True), params, 30)
  w = np.asarray(params["w"].astype(jnp.float32))
  alpha = np.asarray(optax.tree.get(state, "alpha")["w"])
  assert params["w"].dtype == dtype and alpha.shape == (8,)
  np.testing.assert_array_equal(np.abs(w), np.broadcast_to(alpha, w.shape))


def test_bfloat16_first_moment():
  params = make_params()
  new, state = run(lab_optax.lab(0.05, mu_dtype=jnp.bfloat16), params, 5)
  mu, nu = optax.tree.get(state, "mu"), optax.tree.get(state, "nu")
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
  assert isinstance(mu["steps"], optax.MaskedNode)
  assert all_finite((new, state))
  # The same run with a float32 first moment, up to bfloat16 rounding.
  ref, ref_state = run(lab_optax.lab(0.05), params, 5)
  np.testing.assert_allclose(
    mu["layer"]["bias"].astype(jnp.float32),
    optax.tree.get(ref_state, "mu")["layer"]["bias"],
    rtol=2e-2,
  )
  np.testing.assert_allclose(new["layer"]["bias"], ref["layer"]["bias"], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("make", [lab_optax.lab, lab_optax.bwn, lab_optax.binary_connect])
@pytest.mark.parametrize(
  "kwargs", [{"b1": -0.1}, {"b2": 1}, {"b2": 1.5}, {"clip": -1.0}, {"eps": -1}]
)
def test_out_of_range_python_hyperparameters_fail_at_construction(make, kwargs):
  (name,) = kwargs
  with pytest.raises(ValueError, match=name):
    make(0.1, **kwargs)


def test_array_and_traced_hyperparameters_are_accepted():
  params = make_params()
  grads = float_grads(params, 0)
  hyper = {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "clip": 0.5}
  tx = lab_optax.lab(0.1, **hyper)
  state = jax.jit(tx.init)(params)
  expected, _ = jax.jit(tx.update)(grads, state, params)

  as_arrays = {k: jnp.asarray(v) for k, v in hyper.items()}
  got, _ = jax.jit(lab_optax.lab(0.1, **as_arrays).update)(grads, state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)

  @jax.jit
  def traced(hyper):
    return lab_optax.lab(0.1, **hyper).update(grads, state, params)[0]

  got = traced(as_arrays)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)

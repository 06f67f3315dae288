"""The transformation held against the NumPy reference, and its compositions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpy_reference import Reference, sign0

import lab_optax

METHODS = {"lab": lab_optax.lab, "bwn": lab_optax.bwn, "binary_connect": lab_optax.binary_connect}


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  dense = rng.uniform(-1.2, 1.2, (6, 5)).astype(np.float32)
  dense[0, :] = 0.0  # exact zeros that never move: they must come out as +alpha
  return {
    "dense": dense,
    "conv": rng.uniform(-0.5, 0.5, (3, 3, 2, 4)).astype(np.float32),
    "bias": rng.normal(size=(5,)).astype(np.float32),
    "bn_scale": np.ones((4,), np.float32),
    "steps": np.arange(3, dtype=np.int32),
  }


def make_grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    g = {
      k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in params.items() if k != "steps"
    }
    g["dense"][0, :] = 0.0
    out.append(g)
  return out


def jax_tree(params):
  return {k: jnp.asarray(v) for k, v in params.items()}


def grads_tree(g):
  tree = {k: jnp.asarray(v) for k, v in g.items()}
  tree["steps"] = jnp.zeros(3, jnp.int32)
  return tree


def assert_two_values(params, state):
  """Every binarized leaf holds exactly +-alpha, alpha being the state's."""
  latent, alphas = optax.tree.get(state, "latent"), optax.tree.get(state, "alpha")
  for name, w in latent.items():
    if isinstance(w, optax.MaskedNode):
      continue
    p = np.asarray(params[name])
    alpha = np.asarray(alphas[name])
    np.testing.assert_array_equal(p, (alpha * sign0(np.asarray(w))).astype(p.dtype))
    assert len(np.unique(np.abs(p), axis=None)) <= (alpha.size if alpha.ndim else 1)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_numpy_reference_step_by_step(method, per_channel):
  params0 = make_params()
  grads = make_grads(params0, 25)
  lr = 0.05
  ref = Reference(method, params0, ["dense", "conv"], lr=lr, per_channel=per_channel)
  tx = METHODS[method](lr, per_channel=per_channel)
  update = jax.jit(tx.update)
  params = jax_tree(params0)
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)
  for name in ("dense", "conv"):
    np.testing.assert_allclose(params[name], ref.params[name], rtol=1e-5, atol=1e-6)
  assert_two_values(params, state)
  clipped = 0
  for g in grads:
    ref.step(g)
    updates, state = update(grads_tree(g), state, params)
    params = optax.apply_updates(params, updates)
    assert_two_values(params, state)
    for name in ("dense", "conv"):
      latent_ref = ref.latent[name]
      np.testing.assert_allclose(state.latent[name], latent_ref, atol=2e-5)
      far = np.abs(latent_ref) > 1e-4
      np.testing.assert_array_equal(
        sign0(np.asarray(state.latent[name]))[far], sign0(latent_ref)[far]
      )
      np.testing.assert_allclose(
        np.squeeze(state.alpha[name]), np.squeeze(ref.alpha[name]), rtol=2e-5
      )
      clipped += int(np.sum(np.abs(latent_ref) == 1.0))
    for name in ("bias", "bn_scale"):
      np.testing.assert_allclose(params[name], ref.params[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(params["steps"], params0["steps"])
    # Exact zeros of the latent come out as +alpha.
    np.testing.assert_array_equal(np.asarray(state.latent["dense"])[0], 0.0)
    assert (np.asarray(params["dense"])[0] > 0).all()
  assert clipped > 0, "the test must exercise clipping of the latent weights"
  assert state.count == len(grads)


def test_custom_mask_and_callable_mask_give_plain_adam_elsewhere():
  params0 = make_params()
  grads = make_grads(params0, 5)
  mask = {"dense": False, "conv": True, "bias": False, "bn_scale": False, "steps": False}
  for m in (mask, lambda p: mask):
    ref = Reference("lab", params0, ["conv"], lr=0.01)
    tx = lab_optax.lab(0.01, mask=m)
    params = jax_tree(params0)
    state = tx.init(params)
    params = lab_optax.binarize_params(params, state)
    assert isinstance(state.latent["dense"], optax.MaskedNode)
    for g in grads:
      ref.step(g)
      updates, state = tx.update(grads_tree(g), state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["dense"], ref.params["dense"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["conv"], ref.params["conv"], rtol=1e-5)


def test_default_mask_binarizes_kernels_only():
  params = jax_tree(make_params())
  state = lab_optax.lab(0.1).init(params)
  binarized = {k for k, v in state.latent.items() if not isinstance(v, optax.MaskedNode)}
  assert binarized == {"dense", "conv"}
  assert isinstance(state.mu["steps"], optax.MaskedNode)
  assert lab_optax.default_mask(params) == {
    "dense": True,
    "conv": True,
    "bias": False,
    "bn_scale": False,
    "steps": False,
  }


def test_missing_params_raise():
  tx = lab_optax.lab(0.1)
  params = jax_tree(make_params())
  state = tx.init(params)
  with pytest.raises(ValueError, match="need the current params"):
    tx.update(params, state)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"b1": 1.0}, "b1"),
    ({"b2": -0.1}, "b2"),
    ({"eps": -1e-8}, "eps"),
    ({"clip": 0.0}, "clip"),
    ({"b2": np.float32(1.5)}, "b2"),
    ({"eps": float("nan")}, "eps"),
    ({"clip": np.float64("nan")}, "clip"),
  ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lab_optax.lab(0.1, **kwargs)


def test_no_state_leaf_aliases_another_or_the_params():
  params = jax_tree(make_params())
  state = lab_optax.lab(0.1).init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
  assert len(pointers) == len(set(pointers))


def loss_fn(params, x):
  h = jnp.tanh(x @ params["dense"] + params["bias"])
  return jnp.mean((h - 0.5) ** 2) + 1e-3 * jnp.sum(params["conv"] ** 2) * jnp.sum(
    params["bn_scale"]
  )


def float_params():
  # optax's own wrappers (clipping, apply_if_finite) cannot take the float0
  # gradients of integer leaves, so composition tests use floating leaves only.
  params = jax_tree(make_params())
  del params["steps"]
  return params


def train_steps(tx, params, loss, x, steps, grad_transform=lambda g, i: g):
  """Jitted, donated steps of ``loss``'s gradient from the t = 1 projection.

  Returns the last params and state, and the history of (params, state) as numpy.
  """
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, i):
    g = grad_transform(jax.grad(loss)(params, x), i)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for i in range(steps):
    params, state = step(params, state, i)
    history.append(jax.tree.map(np.asarray, (params, state)))
  return params, state, history


def run(tx, steps=6, params=None, grad_transform=lambda g, i: g):
  params = float_params() if params is None else params
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 6)), jnp.float32)
  params, state, history = train_steps(tx, params, loss_fn, x, steps, grad_transform)
  return params, state, [p for p, _ in history]


def test_jit_with_donated_buffers_matches_eager():
  params, state, history = run(lab_optax.lab(0.05))
  assert_two_values(params, state)
  # Same run without jit or donation.
  tx = lab_optax.lab(0.05)
  p = float_params()
  s = tx.init(p)
  p = lab_optax.binarize_params(p, s)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 6)), jnp.float32)
  for _ in range(6):
    g = jax.grad(loss_fn)(p, x)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, p), history[-1], rtol=1e-5, atol=1e-6)


def test_inside_chain_with_gradient_clipping():
  _, _, chained = run(optax.chain(optax.clip_by_global_norm(1e-3), lab_optax.lab(0.05)))

  def clip(g, i):
    scale = jnp.minimum(1.0, 1e-3 / optax.tree.norm(g))
    return jax.tree.map(lambda v: v * scale, g)

  _, _, manual = run(lab_optax.lab(0.05), grad_transform=clip)
  chex.assert_trees_all_close(chained, manual, rtol=1e-5)


def test_inject_hyperparams_and_schedules():
  # Injected hyperparameters are float32 arrays, so 1 - b2 rounds differently
  # than with Python floats: compare with a looser tolerance.
  _, state, injected = run(optax.inject_hyperparams(lab_optax.lab)(learning_rate=0.05))
  _, _, plain = run(lab_optax.lab(0.05))
  chex.assert_trees_all_close(injected, plain, rtol=1e-4, atol=1e-5)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.05)
  # A schedule gives the same as injecting that schedule.
  schedule = optax.exponential_decay(0.05, 1, 0.5)
  _, _, scheduled = run(lab_optax.lab(schedule))
  _, _, injected_schedule = run(optax.inject_hyperparams(lab_optax.lab)(learning_rate=schedule))
  chex.assert_trees_all_close(scheduled, injected_schedule, rtol=1e-4, atol=1e-5)
  assert not np.allclose(scheduled[-1]["bias"], plain[-1]["bias"])
  # A callable mask must be declared static, as for optax.adamw.
  tx = optax.inject_hyperparams(lab_optax.lab, static_args="mask")(
    0.05, mask=lab_optax.default_mask
  )
  _, _, masked = run(tx)
  chex.assert_trees_all_close(masked, plain, rtol=1e-4, atol=1e-5)


def test_multi_steps_applies_the_mean_gradient_every_k_steps():
  _, state, multi = run(optax.MultiSteps(lab_optax.lab(0.05), every_k_schedule=2), steps=4)
  start = lab_optax.binarize_params(float_params(), lab_optax.lab(0.05).init(float_params()))
  chex.assert_trees_all_equal(multi[0], jax.tree.map(np.asarray, start))
  assert not np.array_equal(multi[1]["dense"], multi[0]["dense"]) or not np.array_equal(
    multi[1]["bias"], multi[0]["bias"]
  )
  chex.assert_trees_all_equal(multi[2], multi[1])
  assert_two_values(jax.tree.map(jnp.asarray, multi[3]), state)


def test_apply_if_finite_skips_non_finite_gradients():
  def poison(g, i):
    bad = jnp.where(i % 2 == 1, jnp.nan, 0.0)
    return {k: (v + bad if k == "dense" else v) for k, v in g.items()}

  _, state, history = run(optax.apply_if_finite(lab_optax.lab(0.05), 10), grad_transform=poison)
  chex.assert_trees_all_equal(history[1], history[0])
  chex.assert_trees_all_equal(history[3], history[2])
  assert all(np.isfinite(h["dense"]).all() for h in history)
  assert int(state.total_notfinite) == 3


def test_nnx_optimizer_trains_and_keeps_binary_kernels():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, lab_optax.lab(0.01), wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  nnx.update(
    model, lab_optax.binarize_params(nnx.as_pure(params), nnx.as_pure(optimizer.opt_state))
  )
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  y = jnp.sin(x[:, :1])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0]
  for kernel in (model.l1.kernel[...], model.l2.kernel[...]):
    assert len(np.unique(np.abs(np.asarray(kernel)))) == 1
  assert len(np.unique(np.asarray(model.l1.bias[...]))) > 2


def test_two_values_hold_in_low_precision_and_over_many_steps():
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    params = {"w": (jax.random.normal(jax.random.key(0), (32, 16)) * 0.05).astype(dtype)}
    tx = lab_optax.lab(0.02)
    state = tx.init(params)
    params = lab_optax.binarize_params(params, state)
    update = jax.jit(tx.update)
    for i in range(40):
      g = {"w": jax.random.normal(jax.random.key(i + 1), (32, 16)).astype(dtype)}
      updates, state = update(g, state, params)
      params = optax.apply_updates(params, updates)
      assert params["w"].dtype == dtype
      assert_two_values(params, state)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_apply_updates_lands_exactly_on_alpha_for_large_changes(dtype):
  """alpha_old -> alpha over ratios from 1e-5 to 1e3, both signs: p + (n - p) == n exactly."""
  from lab_optax._src.transform import _representable_alpha, _round_significand

  rng = np.random.default_rng(0)
  old = _round_significand(jnp.asarray(10.0 ** rng.uniform(-3, 1, 4000), jnp.float32), dtype)
  ratio = 10.0 ** rng.uniform(-5, 3, 4000)
  alpha = _representable_alpha(jnp.asarray(old * ratio, jnp.float32), old, dtype)
  assert bool(jnp.all(alpha > 0))
  for sign_old, sign_new in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
    p = (sign_old * old).astype(dtype)
    n = sign_new * alpha
    u = (n - p.astype(jnp.float32)).astype(dtype)  # as the transformation computes it
    np.testing.assert_array_equal(optax.apply_updates(p, u), n.astype(dtype))
  # A drop is followed as closely as the old alpha's grid allows; growth is bounded by 2x.
  bits = jnp.finfo(dtype).nmant - 1
  target = np.minimum(old * ratio, 2 * np.asarray(old))
  error = np.abs(np.asarray(alpha) - target) / target
  bound = np.maximum(np.asarray(old) / target, 2.0) * 2.0**-bits
  drops = ratio * 2.0**bits > 1  # within one step's reach
  assert np.all(error[drops] <= bound[drops])


def test_tiny_alphas_drop_without_nan():
  from lab_optax._src.transform import _representable_alpha

  old = jnp.array([1e-33, 1e-31, 2e-38, 1e-20], jnp.float32)
  alpha = _representable_alpha(old * 1e-3, old, jnp.float32)
  assert bool(jnp.all(jnp.isfinite(alpha)))
  params = {"w": jnp.full((4, 4), 1e-33, jnp.float32).at[0, 0].set(1e-32)}
  tx = lab_optax.bwn(1e-33, clip=None)
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)
  updates, state = tx.update({"w": jnp.ones((4, 4))}, state, params)
  params = optax.apply_updates(params, updates)
  assert bool(jnp.all(jnp.isfinite(params["w"])))
  assert_two_values(params, state)


def test_alpha_follows_the_closed_form_when_it_drops_more_than_2x():
  """Curvature concentrated on a few small weights: LAB's alpha drops far in one step."""
  w = np.full((8, 8), 0.375, np.float32) * np.where(np.arange(64).reshape(8, 8) % 2, 1, -1)
  w[0, 0], w[0, 1] = 0.001, -0.0015
  params = {"w": jnp.asarray(w)}
  tx = lab_optax.lab(1e-4, eps=1e-8)
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)
  g = np.zeros_like(w)
  g[0, 0], g[0, 1] = 1.0, -1.0
  updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
  params = optax.apply_updates(params, updates)
  latent = np.asarray(optax.tree.get(state, "latent")["w"], np.float64)
  nu = np.asarray(optax.tree.get(state, "nu")["w"], np.float64)
  d = np.sqrt(nu / (1 - 0.999)) + 1e-8
  expected = np.sum(d * np.abs(latent)) / np.sum(d)
  alpha = float(optax.tree.get(state, "alpha")["w"])
  assert expected < 0.01 * 0.375  # the closed form drops by more than 100x
  np.testing.assert_allclose(alpha, expected, rtol=1e-4)
  assert_two_values(params, state)


def test_binarize_params_finds_nested_state_and_rejects_others():
  params = jax_tree(make_params())
  tx = optax.chain(
    optax.clip(1.0), optax.MultiSteps(lab_optax.bwn(0.1), 2).gradient_transformation()
  )
  state = tx.init(params)
  out = lab_optax.binarize_params(params, state)
  alpha = np.mean(np.abs(np.asarray(params["dense"])))
  np.testing.assert_allclose(np.abs(out["dense"]), alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["bias"], params["bias"])
  with pytest.raises(ValueError, match="no lab_optax state"):
    lab_optax.binarize_params(params, optax.adam(0.1).init(params))
  latent = lab_optax.latent_weights(state)
  np.testing.assert_array_equal(latent["dense"], params["dense"])


def test_per_channel_refuses_leaves_with_one_weight_per_channel():
  params = {"kernel": jnp.ones((3, 4)), "row": jnp.ones((1, 4)), "bias": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"\['row'\] has shape \(1, 4\)"):
    lab_optax.lab(0.1, per_channel=True).init(params)
  with pytest.raises(ValueError, match=r"\['bias'\] has shape \(4,\)"):
    lab_optax.lab(0.1, per_channel=True, mask={"kernel": True, "row": False, "bias": True}).init(
      params
    )
  state = lab_optax.lab(0.1, per_channel=True, mask={"kernel": True, "row": False, "bias": False})
  assert optax.tree.get(state.init(params), "alpha")["kernel"].shape == (4,)
  # One alpha per tensor is fine for a single row.
  lab_optax.lab(0.1).init(params)


def test_mismatched_trees_and_shapes_name_the_leaf():
  params = {"a": jnp.ones((4, 2)), "b": jnp.ones(3)}
  tx = lab_optax.lab(0.1)
  state = tx.init(params)
  grads = {"a": jnp.ones((4, 2)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"the gradient at \['a'\] has shape \(2,\)"):
    tx.update({"a": jnp.ones(2), "b": jnp.ones(3)}, state, params)
  with pytest.raises(ValueError, match="the params do not have the structure"):
    tx.update(grads, state, {"a": params["a"]})
  other = tx.init({"a": jnp.ones((2, 4)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"the latent weight tensor at \['a'\] has shape \(2, 4\)"):
    tx.update(grads, other, params)
  with pytest.raises(ValueError, match=r"the latent weight tensor at \['a'\] has shape \(2, 4\)"):
    lab_optax.binarize_params(params, other)
  with pytest.raises(ValueError, match="latent weights do not have the structure"):
    lab_optax.binarize_params({"a": params["a"], "c": params["b"]}, state)


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
def test_weight_decay_is_decoupled_and_applied_to_the_latent_weights(implementation):
  rng = np.random.default_rng(5)
  params = {
    "kernel": jnp.asarray(rng.uniform(-0.5, 0.5, (64, 80)), jnp.float32),
    "bias": jnp.ones(80),
  }
  tx = lab_optax.lab(0.1, weight_decay=0.5, implementation=implementation)
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, new_state = jax.jit(tx.update)(zeros, state, params)
  # A zero gradient gives a zero Adam step: only the decay moves the weights, as in optax.adamw.
  latent = np.asarray(state.latent["kernel"])
  np.testing.assert_allclose(new_state.latent["kernel"], latent - 0.1 * 0.5 * latent, rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], -0.1 * 0.5 * np.ones(80), rtol=1e-6)
  adamw = optax.adamw(0.1, weight_decay=0.5)
  expected, _ = adamw.update(zeros, adamw.init(params), params)
  np.testing.assert_allclose(updates["bias"], expected["bias"], rtol=1e-6)

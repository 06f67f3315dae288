"""optax's generic optimizer tests, adapted to a projected optimizer, over every lab_optax optimizer.

Adapted from optax's ``alias_test.py``, ``contrib/_common_test.py``,
``transforms/_masking_test.py``, ``_combining_test.py``, ``float64_test.py``,
``tree_utils/_state_utils_test.py``, ``transforms/_conditionality_test.py`` and
``_accumulation_test.py``. "Reaches the optimum" becomes "the loss decreases and
every quantized leaf stays on its level set".

A new optimizer is one more line in ``OPTIMIZERS``. The wrapper mechanics are
the same code for every method and run on ``FULL`` only; what differs between
methods (the projection, the first projection, NaN, ``learning_rate=0``) runs
on all of them. The rules of the README's "What composes" table are the tests
named ``test_composes_*`` and ``test_does_not_compose_*``.
"""

import dataclasses
import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import grid
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax._src import test_utils

import lab_optax

OPTIMIZERS = {
  "lab": lab_optax.lab,
  "bwn": lab_optax.bwn,
  "binary_connect": lab_optax.binary_connect,
  "lat": lab_optax.lat,
  "lat_exact": functools.partial(lab_optax.lat, solver="exact"),
  "lat2": functools.partial(lab_optax.lat, scales=2),
  "laq3": lab_optax.laq,
  "laq3_log": functools.partial(lab_optax.laq, levels="log"),
  "twn": lab_optax.twn,
  "absmean": lab_optax.absmean_ternary,
}
ALL = list(OPTIMIZERS)
FULL = ["lab"]  # the whole battery; the others get the parts that differ between methods
BINARY = ["lab", "bwn", "binary_connect"]


def is_masked(x):
  return isinstance(x, optax.MaskedNode)


def lab_optax_states(opt_state):
  is_state = lambda x: isinstance(x, lab_optax.ProjectedAdamState)  # noqa: E731
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]


def assert_on_level_set(params, opt_state):
  """Every quantized leaf holds exactly ``scale * codes`` of its state, on the level set.

  The params equal what ``quantize_params`` rebuilds from the latent weights and
  scales, and a leaf holds at most as many values as the level set has, per
  scale (per output channel with ``per_channel=True``).
  """
  chex.assert_trees_all_equal(lab_optax.quantize_params(params, opt_state), params)
  checked = 0
  for state in lab_optax_states(opt_state):
    latent = state.latent
    flat_p = jax.tree.leaves(params)
    flat_w = jax.tree.structure(params).flatten_up_to(
      jax.tree.broadcast(latent, params, is_leaf=is_masked)
    )
    flat_a = jax.tree.structure(params).flatten_up_to(
      jax.tree.broadcast(state.alpha, params, is_leaf=is_masked)
    )
    for p, w, a in zip(flat_p, flat_w, flat_a):
      if is_masked(w):
        continue
      p = np.asarray(p, np.float32)
      assert np.isfinite(p).all()
      per_channel = np.ndim(a) - (state.projection.num_scales > 1) >= 1
      columns = p.reshape(-1, p.shape[-1]).T if per_channel else [p.ravel()]
      for column in columns:
        assert len(np.unique(column)) <= len(state.projection.levels)
      checked += 1
  assert checked, "no quantized leaf was checked"


# Targets, as in optax's tests: a parabola over a matrix, and a mix of shapes.


def matrix_parabola(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  target = np.sign(rng.normal(size=(6, 4))) * 0.5
  params = {"w": jnp.asarray(rng.normal(size=(6, 4)) * 0.1, dtype)}
  return params, lambda p: jnp.sum((p["w"] - jnp.asarray(target, p["w"].dtype)) ** 2)


def mixed_target(dtype=jnp.float32):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(32, 5)), dtype)
  y = jnp.asarray(np.tanh(rng.normal(size=(32, 3))), dtype)
  params = {
    "k1": jnp.asarray(rng.uniform(-0.5, 0.5, (5, 8)), dtype),
    "b1": jnp.zeros((8,), dtype),
    "k2": jnp.asarray(rng.uniform(-0.5, 0.5, (8, 3)), dtype),
    "b2": jnp.zeros((3,), dtype),
  }

  def loss(p):
    h = jnp.tanh(x @ p["k1"] + p["b1"])
    return jnp.mean((h @ p["k2"] + p["b2"] - y) ** 2)

  return params, loss


TARGETS = {"matrix_parabola": matrix_parabola, "mixed": mixed_target}


def make_step(tx, loss, **update_kwargs):
  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, **update_kwargs)
    return optax.apply_updates(params, updates), state, value

  return step


def start(tx, params):
  state = tx.init(params)
  return lab_optax.binarize_params(params, state), state


def train(tx, params, loss, steps=200, **update_kwargs):
  params, state = start(tx, params)
  step = make_step(tx, loss, **update_kwargs)
  first = float(loss(params))
  (params, state), _ = jax.lax.scan(
    lambda c, _: (step(*c)[:2], None), (params, state), length=steps
  )
  return params, state, first, float(loss(params))


# --- optimization ------------------------------------------------------------


# Each optimizer on one of the two targets by default (alternating), both with -m slow.
@pytest.mark.parametrize(
  "name, target",
  grid(ALL, list(TARGETS), fast=[(n, list(TARGETS)[i % 2]) for i, n in enumerate(ALL)]),
)
def test_optimization_decreases_the_loss_on_the_level_set(name, target):
  params, loss = TARGETS[target]()
  tx = OPTIMIZERS[name](0.02)
  # tree_map_params works on the state (a no-op map, as optax's test does).
  _, state = start(tx, params)
  optax.tree.map_params(tx, lambda v: v, state, is_leaf=is_masked)
  params, state, first, last = train(tx, params, loss)
  assert last < first
  assert_on_level_set(params, state)


@pytest.mark.parametrize("name", ALL)
def test_accepts_extra_args_and_does_not_recompile(name):
  params, loss = mixed_target()
  tx = OPTIMIZERS[name](0.01)
  # nnx.Optimizer.update passes value=loss on; optax's optimizers ignore such arguments.
  step = make_step(
    tx, loss, value=jnp.ones(()), unexpected_extra_args_your_optimizer_doesnt_expect=1
  )
  params, state = start(tx, params)
  for _ in range(2):
    params, state, _ = step(params, state)
  with test_utils.log_compilations() as logs:
    step(params, state)
  assert not logs
  assert isinstance(tx, optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("name", FULL)
def test_can_be_wrapped_in_inject_hyperparams(name):
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
  opt = OPTIMIZERS[name](0.1)
  injected = optax.inject_hyperparams(OPTIMIZERS[name])(learning_rate=0.1)
  u, s = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  ui, si = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
  chex.assert_trees_all_close(ui, u, rtol=1e-5)
  chex.assert_trees_all_close(si.inner_state, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", FULL)
def test_preserves_the_params_dtype(name, dtype):
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype), "b": jnp.array([1.0, 2.0], dtype)}
  opt = OPTIMIZERS[name](0.1)
  grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))(params)
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  assert jax.tree.map(lambda u: u.dtype, updates) == {"w": dtype, "b": dtype}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", FULL)
def test_gradient_accumulation_gives_zero_updates_between_steps(name, dtype):
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype)}
  opt = optax.MultiSteps(OPTIMIZERS[name](0.1), every_k_schedule=4)
  grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))


STATE_DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", FULL)
def test_state_keeps_shapes_and_dtypes_across_update(name, dtype):
  """As optax's test_state_shape_dtype_shard_stability, and so lax.cond/scan/fori_loop work."""
  with jax.enable_x64(dtype == jnp.float64):
    params, loss = mixed_target(dtype)
    tx = OPTIMIZERS[name](0.01)
    params, state = start(tx, params)
    step = make_step(tx, loss)
    new_params, new_state, _ = step(params, state)
    shape_dtype = functools.partial(jax.tree.map, lambda x: (jnp.shape(x), jnp.result_type(x)))
    assert shape_dtype(new_state) == shape_dtype(state)
    assert shape_dtype(new_params) == shape_dtype(params)
    # The reason it matters: control flow over the state needs equal types.
    jax.lax.cond(True, lambda s: step(*s)[:2], lambda s: s, (params, state))


@pytest.mark.parametrize("name", FULL)
def test_alpha_dtype_is_fixed_at_init(name):
  with jax.enable_x64(True):
    tx = OPTIMIZERS[name](0.01)
    p32 = {"w": jnp.ones((4, 3), jnp.float32)}
    p64 = {"w": jnp.ones((4, 3), jnp.float64)}
    for params, dtype in ((p32, jnp.float32), (p64, jnp.float64)):
      state = tx.init(params)
      _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      assert state.alpha["w"].dtype == dtype


# --- empty trees -------------------------------------------------------------


@pytest.mark.parametrize("empty", [{}, [], ()], ids=["dict", "list", "tuple"])
@pytest.mark.parametrize("name", FULL)
def test_empty_trees_are_a_no_op(name, empty):
  tx = OPTIMIZERS[name](0.1)
  state = tx.init(empty)
  updates, new_state = jax.jit(tx.update)(empty, state, empty)
  assert updates == empty
  assert int(new_state.count) == 1
  assert lab_optax.binarize_params(empty, state) == empty


@pytest.mark.parametrize("name", FULL)
def test_masked_with_nothing_selected_and_partition_without_params(name):
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.masked(OPTIMIZERS[name](0.1), {})
  state = tx.init({})
  assert tx.update({}, state, {})[0] == {}
  # A partition whose lab_optax group matches no param.
  tx = optax.partition({"q": OPTIMIZERS[name](0.1), "fp": optax.adam(0.1)}, {"w": "fp", "b": "fp"})
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  expected, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params), params)
  chex.assert_trees_all_close(updates, expected)
  assert lab_optax.binarize_params(params, state) == params


# --- masking -----------------------------------------------------------------


def two_layers():
  rng = np.random.default_rng(2)
  return {
    "enc": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)},
    "dec": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "bias": jnp.zeros(2)},
  }


def two_layer_loss(p):
  x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  h = jnp.tanh(x @ p["enc"]["kernel"] + p["enc"]["bias"])
  return jnp.sum((h @ p["dec"]["kernel"] + p["dec"]["bias"] - 0.3) ** 2)


@pytest.mark.parametrize("mask_kind", ["full", "prefix", "callable"])
@pytest.mark.parametrize("name", FULL)
def test_composes_with_optax_masked(name, mask_kind):
  params = two_layers()
  full = {"enc": {"kernel": True, "bias": True}, "dec": {"kernel": False, "bias": False}}
  mask = {
    "full": full,
    "prefix": {"enc": True, "dec": False},
    "callable": lambda p: jax.tree.map(lambda _: True, p) | {"dec": False},
  }[mask_kind]
  tx = optax.masked(OPTIMIZERS[name](0.05), mask)
  state = tx.init(params)
  binarized = lab_optax.binarize_params(params, state)
  # The masked-out layer stays as it was; the other is on the binary set.
  chex.assert_trees_all_equal(binarized["dec"], params["dec"])
  assert len(np.unique(np.abs(binarized["enc"]["kernel"]))) == 1
  step = make_step(tx, two_layer_loss)
  p, s = binarized, state
  for _ in range(5):
    p, s, _ = step(p, s)
  assert_on_level_set(p, s)


@pytest.mark.parametrize("name", FULL)
def test_a_callable_pytree_is_a_mask_not_a_function(name):
  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Module:  # equinox-style: a pytree that is also callable
    kernel: bool
    scale: bool

    def __call__(self, x):
      raise AssertionError("the mask must not be called")

  params = Module(kernel=jnp.array([[0.3, -0.1], [0.2, 0.4]]), scale=jnp.ones((2, 2)))
  tx = OPTIMIZERS[name](0.1, mask=Module(kernel=True, scale=False))
  state = tx.init(params)
  assert not is_masked(state.latent.kernel) and is_masked(state.latent.scale)
  # optax.masked takes the same mask the same way.
  inner = optax.masked(OPTIMIZERS[name](0.1), Module(kernel=True, scale=False)).init(params)
  assert is_masked(inner.inner_state.latent.scale)


# --- combining ---------------------------------------------------------------


@pytest.mark.parametrize("name", FULL)
def test_composes_with_chain_before_it(name):
  params, loss = mixed_target()
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), optax.add_noise(0.0, 0.5, 0), OPTIMIZERS[name](0.02)
  )
  params, state, first, last = train(tx, params, loss, steps=50)
  assert last < first
  assert_on_level_set(params, state)


@pytest.mark.parametrize("name", FULL)
def test_composes_with_partition_of_two_lab_optax_groups(name):
  params, loss = mixed_target()
  labels = {"k1": "a", "k2": "b", "b1": "fp", "b2": "fp"}
  tx = optax.partition(
    {
      "a": OPTIMIZERS[name](0.02),
      "b": lab_optax.bwn(0.01, per_channel=True),
      "fp": optax.adam(0.01),
    },
    labels,
  )
  state = tx.init(params)
  binarized = lab_optax.binarize_params(params, state)
  k1 = np.asarray(params["k1"])
  np.testing.assert_allclose(np.abs(binarized["k1"]), np.mean(np.abs(k1)), rtol=1e-5)
  k2 = np.asarray(params["k2"])
  np.testing.assert_allclose(
    np.abs(binarized["k2"]), np.broadcast_to(np.mean(np.abs(k2), 0), k2.shape), rtol=1e-5
  )
  latent = lab_optax.latent_weights(state)
  assert set(k for k, v in latent.items() if not is_masked(v)) == {"k1", "k2"}
  params, state, first, last = train(tx, params, loss, steps=50)
  assert last < first
  assert_on_level_set(params, state)
  # Two states that claim one leaf are refused.
  both = optax.chain(OPTIMIZERS[name](0.1), lab_optax.bwn(0.1))
  with pytest.raises(ValueError, match=r"two lab_optax states .* \['k1'\]"):
    lab_optax.binarize_params(params, both.init(params))


@pytest.mark.parametrize("name", FULL)
def test_composes_with_apply_if_finite(name):
  params, loss = mixed_target()
  tx = optax.apply_if_finite(OPTIMIZERS[name](0.05), max_consecutive_errors=3)
  params, state = start(tx, params)

  @jax.jit
  def bad_step(params, state):
    grads = jax.tree.map(lambda g: g * jnp.nan, jax.grad(loss)(params))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new_params, new_state = bad_step(params, state)
  chex.assert_trees_all_equal(new_params, params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1


@pytest.mark.parametrize("name", FULL)
def test_composes_with_multi_steps_and_inject_hyperparams(name):
  params, loss = mixed_target()
  tx = optax.MultiSteps(
    optax.inject_hyperparams(OPTIMIZERS[name])(learning_rate=0.02), every_k_schedule=2
  )
  params, state, first, last = train(tx, params, loss, steps=40)
  assert last < first
  assert_on_level_set(params, state)


@pytest.mark.parametrize("name", FULL)
def test_conditionally_applied_with_lax_cond_over_the_state(name):
  params, loss = mixed_target()
  tx = OPTIMIZERS[name](0.02)
  params, state = start(tx, params)
  step = make_step(tx, loss)

  @jax.jit
  def maybe(flag, params, state):
    return jax.lax.cond(flag, lambda c: step(*c)[:2], lambda c: c, (params, state))

  skipped = maybe(False, params, state)
  chex.assert_trees_all_equal(skipped, (params, state))
  taken = maybe(True, params, state)
  assert_on_level_set(*taken)


def _is_off_the_level_set(params, opt_state):
  try:
    assert_on_level_set(params, opt_state)
  except AssertionError:
    return True
  return False


@pytest.mark.parametrize("name", FULL)
def test_does_not_compose_with_transforms_after_it(name):
  """``update`` returns ``new_params - params``: anything after it moves params off the set."""
  params, loss = mixed_target()
  tx = optax.chain(OPTIMIZERS[name](0.02), optax.scale(0.5))
  params, state, _, _ = train(tx, params, loss, steps=5)
  assert _is_off_the_level_set(params, state)


@pytest.mark.parametrize("name", FULL)
def test_does_not_compose_with_lookahead_or_an_ema_of_params(name):
  """Averaging params (lookahead's slow weights, an EMA) leaves the level set."""
  params, loss = mixed_target()
  tx = optax.lookahead(OPTIMIZERS[name](0.05), sync_period=2, slow_step_size=0.5)
  state = tx.init(optax.LookaheadParams.init_synced(params))
  params = lab_optax.binarize_params(params, state)
  lookahead_params = optax.LookaheadParams.init_synced(params)
  distinct = []
  for _ in range(2):
    grads = jax.grad(loss)(lookahead_params.fast)
    updates, state = tx.update(grads, state, lookahead_params)
    lookahead_params = optax.apply_updates(lookahead_params, updates)
    distinct.append(len(np.unique(np.abs(np.asarray(lookahead_params.fast["k1"])))))
  # On the set after a fast step; off it once the sync averages slow and fast weights.
  assert distinct[0] == 1 and distinct[1] > 1
  ema = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, *_two_trained(name, params, loss))
  assert len(np.unique(np.abs(np.asarray(ema["k1"])))) > 1


def _two_trained(name, params, loss):
  tx = OPTIMIZERS[name](0.05)
  p, s = start(tx, params)
  step = make_step(tx, loss)
  p1, s, _ = step(p, s)
  p2, s, _ = step(p1, s)
  for _ in range(5):
    p2, s, _ = step(p2, s)
  return p, p2


@pytest.mark.parametrize("name", FULL)
def test_does_not_compose_with_schedule_free(name):
  """schedule_free interpolates between its iterates: the params it returns are off the set."""
  params, loss = mixed_target()
  tx = optax.contrib.schedule_free(OPTIMIZERS[name](0.05), learning_rate=0.05)
  state = tx.init(params)
  p = params
  for _ in range(4):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
  assert len(np.unique(np.abs(np.asarray(p["k1"])))) > 1


# --- tree utilities, shardings, checkpoints ------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", FULL)
def test_map_params_derives_state_specs_and_alpha_is_not_a_param(name, per_channel):
  params = two_layers()
  specs = {
    "enc": {"kernel": P(None, "model"), "bias": P("model")},
    "dec": {"kernel": P(), "bias": P()},
  }
  tx = OPTIMIZERS[name](0.1, per_channel=per_channel)
  state = tx.init(params)
  out = optax.tree.map_params(
    tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: P(), is_leaf=is_masked
  )
  assert out.mu == specs and out.nu == specs
  assert out.latent["enc"]["kernel"] == P(None, "model")
  assert out.alpha == P() and out.count == P()  # a scale, never the kernel's spec
  # The specs serve as jit's shardings of the state (on a one-device mesh here).
  mesh = jax.make_mesh((1,), ("model",))

  def shard(tree):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, P))

  update = jax.jit(
    tx.update,
    in_shardings=(shard(specs), shard(out), shard(specs)),
    out_shardings=(shard(specs), shard(out)),
  )
  _, new_state = update(jax.tree.map(jnp.ones_like, params), state, params)
  assert new_state.latent["enc"]["kernel"].sharding.spec == P(None, "model")
  # The specs fit the state: every leaf's spec has at most the leaf's rank.
  # The usual no-op map keeps the state.
  chex.assert_trees_all_equal(
    optax.tree.map_params(tx, lambda v: v, state, is_leaf=is_masked), state
  )


@pytest.mark.parametrize("name", FULL)
def test_eval_shape_of_init_is_the_restore_target(name):
  params, loss = mixed_target()
  tx = OPTIMIZERS[name](0.02)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  target = jax.eval_shape(tx.init, abstract)
  _, state = start(tx, params)
  shape_dtype = functools.partial(jax.tree.map, lambda x: (jnp.shape(x), jnp.result_type(x)))
  assert shape_dtype(target) == shape_dtype(state)


# --- what differs between methods ------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_nan_latent_weights_give_nan_params(name):
  params, loss = mixed_target()
  tx = OPTIMIZERS[name](0.05)
  params, state = start(tx, params)
  grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), jax.grad(loss)(params))
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert np.isnan(np.asarray(new["k1"])).all() and np.isnan(np.asarray(new["k2"])).all()


LOSS_AWARE = {"lab", "lat", "lat_exact", "lat2", "laq3", "laq3_log"}


@pytest.mark.parametrize("name", ALL)
def test_learning_rate_zero_keeps_the_latents_but_moves_loss_aware_scales(name):
  params, loss = mixed_target()
  tx = OPTIMIZERS[name](0.0)
  params, state = start(tx, params)
  grads = jax.grad(loss)(params)
  # Jitted, as a training step is: init's scales are compiled too.
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(new_state.latent, state.latent)
  nonzero = np.asarray(new["k1"]) != 0
  np.testing.assert_array_equal(np.sign(new["k1"])[nonzero], np.sign(state.latent["k1"])[nonzero])
  moved = not np.array_equal(new["k1"], params["k1"])
  # A loss-aware scale depends on the curvature d, which the new gradient
  # changes: it moves even with learning_rate=0. BWN's mean|w|, BinaryConnect's
  # 1, TWN's and absmean's scales depend on the latent weights alone.
  assert moved == (name in LOSS_AWARE)


@pytest.mark.parametrize("name", ALL)
def test_complex_leaves_get_plain_adam(name):
  params = {
    "w": jnp.array([[0.3, -0.2], [0.1, 0.5]]),
    "c": jnp.array([1 + 2j, -0.5j], jnp.complex64),
  }
  grads = {"w": jnp.ones((2, 2)), "c": jnp.array([0.3 - 1j, 2 + 0.5j], jnp.complex64)}
  tx = OPTIMIZERS[name](0.1)
  state = tx.init(params)
  assert is_masked(state.latent["c"])  # never quantized
  adam = optax.adam(0.1)
  adam_state = adam.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, adam_state = adam.update(grads, adam_state, params)
    chex.assert_trees_all_close(updates["c"], expected["c"], rtol=1e-4)
  assert updates["c"].dtype == jnp.complex64


@pytest.mark.parametrize("name", ALL)
def test_annotations_are_types_not_strings(name):
  """Tools read the annotations (optax's own schedule test does): they must be evaluated."""
  for fn in (OPTIMIZERS[name], lab_optax.projected_adam):
    annotation = inspect.signature(fn).parameters["learning_rate"].annotation
    assert annotation == optax.ScalarOrSchedule
  for fn in (lab_optax.binarize_params, lab_optax.proximal_binarize, lab_optax.summary):
    assert not any(isinstance(p.annotation, str) for p in inspect.signature(fn).parameters.values())


@pytest.mark.parametrize("name", FULL)
def test_nnx_optimizer_update_with_value_as_in_the_flax_tutorial(name):
  from flax import nnx

  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](0.05), wrt=nnx.Param)
  lab_optax.nnx.binarize_model(model, optimizer)
  x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)

  def loss_fn(model):
    return jnp.mean((model(x) - 0.5) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)  # the tutorial passes the loss on
    return loss

  first = train_step(model, optimizer)
  for _ in range(10):
    last = train_step(model, optimizer)
  assert last < first
  assert len(np.unique(np.abs(np.asarray(model.kernel.get_value())))) == 1

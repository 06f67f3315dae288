"""The blocked update (``implementation="blocked"``, fused.py) held against the reference.

Gradients are drawn once per step and do not depend on the params, so both
runs see the same gradients: the moments and latent weights must agree to the
last bits over many steps, and alpha to the rounding of its sums.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import grid
from hypothesis import given
from hypothesis import strategies as st
from test_transform import assert_two_values, train_steps

import lab_optax
from lab_optax._src import fused

METHODS = {"lab": lab_optax.lab, "bwn": lab_optax.bwn, "binary_connect": lab_optax.binary_connect}


@pytest.fixture
def small_blocks(monkeypatch):
  # Blocks of a few rows: the loops run many iterations and most leaves end in
  # a partial block.
  monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 64)


# NumPy draws the test data: eager jax.random compiles a program per shape,
# which cost seconds per test.
def make_params(shapes, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {
    name: jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float32).astype(dtype)
    for name, shape in shapes.items()
  }


def gradient_sequence(params, steps, seed=1, zero_steps=0):
  """Fixed gradients; the first ``zero_steps`` are exactly zero."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(steps):
    scale = 0.0 if i < zero_steps else 1.0
    out.append(
      {
        k: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32).astype(p.dtype)
        for k, p in params.items()
      }
    )
  return out


def run(tx, params, grads):
  """Jitted, donated steps; returns the history of (params, state) as numpy."""
  params = jax.tree.map(jnp.copy, params)  # donated below
  state = tx.init(params)
  params = lab_optax.binarize_params(params, state)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for g in grads:
    params, state = step(params, state, g)
    history.append(jax.tree.map(np.asarray, (params, state)))
  return history


def assert_alphas_agree(params, state, state_ref, previous_ref, rtol):
  """Alphas equal to ``rtol`` and one unit of the grid that transform.py rounds them to.

  Each alpha is kept on ``nmant - 1`` significant bits of the params' dtype and a
  drop below half the previous alpha is rounded to the previous one's last kept
  bit, so a unit is at most ``2 ** (2 - nmant)`` times the larger of the two
  alphas: where the two paths' unrounded alphas, a rounding apart, fall on either
  side of a grid point, the stored ones are a unit apart (how often depends on the
  CPU's order of the additions in alpha's sums).
  """
  alpha, alpha_ref = optax.tree.get(state, "alpha"), optax.tree.get(state_ref, "alpha")
  old = optax.tree.get(previous_ref if previous_ref is not None else state_ref, "alpha")
  for name, a in alpha.items():
    if isinstance(a, optax.MaskedNode):
      continue
    a, ref, prev = (np.asarray(x, np.float64) for x in (a, alpha_ref[name], old[name]))
    unit = 2.0 ** (2 - jnp.finfo(params[name].dtype).nmant) * np.maximum(ref, prev)
    error = np.abs(a - ref) - rtol * np.abs(ref) - unit
    assert np.all(error <= 0), (name, a, ref)


def assert_params_agree(params, params_ref, state_ref, atol):
  """Signs where the reference's latent weights are farther than ``atol`` from zero
  (with ``assert_two_values`` and the alphas, that is the binarized params); other
  leaves to the moments' tolerance."""
  latent_ref = optax.tree.get(state_ref, "latent")
  for name, w in latent_ref.items():
    p, p_ref = np.asarray(params[name]), np.asarray(params_ref[name])
    if isinstance(w, optax.MaskedNode):
      np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6, err_msg=name)
    else:
      far = np.abs(np.asarray(w, np.float64)) > atol
      np.testing.assert_array_equal(np.sign(p)[far], np.sign(p_ref)[far], err_msg=name)


def assert_runs_agree(blocked, reference, alpha_rtol=1e-5):
  previous = None
  for (p, s), (p_ref, s_ref) in zip(blocked, reference):
    assert_two_values(p, s)
    # The moments are computed by different XLA programs in the two paths, which
    # round a multiply-add differently by one unit in the last place now and
    # then; over 40 steps that compounds to about 2e-7 in the latent weights.
    for field in ("mu", "nu", "latent"):
      chex.assert_trees_all_close(
        optax.tree.get(s, field), optax.tree.get(s_ref, field), rtol=1e-5, atol=1e-6
      )
    assert_alphas_agree(p, s, s_ref, previous, alpha_rtol)
    # A latent weight within the tolerance of zero may have either sign.
    assert_params_agree(p, p_ref, s_ref, atol=2e-6)
    previous = s_ref


def compare(make_tx, params, grads, alpha_rtol=1e-5):
  blocked = run(make_tx(implementation="blocked"), params, grads)
  reference = run(make_tx(implementation="reference"), params, grads)
  assert_runs_agree(blocked, reference, alpha_rtol)
  return blocked, reference


def while_loops(tx, params):
  """The number of while loops in the compiled step: one per leaf updated by blocks."""
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(p, s, p))
  return step.lower(params, state).compile().as_text().count(" while(")


SHAPES = {
  "dense": (37, 23),  # 37 rows: partial last block
  "conv": (3, 3, 5, 7),
  "tall": (130, 2),
  "two_rows": (2, 9),
  "bias": (23,),
}


@pytest.mark.parametrize(
  "per_channel, method",
  grid([False, True], list(METHODS), fast=[(False, "lab"), (True, "binary_connect")]),
)
def test_matches_reference_over_many_steps(method, per_channel, small_blocks):
  params = make_params(SHAPES)
  grads = gradient_sequence(params, 40)
  make_tx = functools.partial(METHODS[method], 0.05, per_channel=per_channel)
  blocked, _ = compare(make_tx, params, grads)
  # The latent weights hit the clip and alpha moved: the test covers both.
  latent = blocked[-1][1].latent
  assert any(np.any(np.abs(latent[k]) == 1.0) for k in ("dense", "conv", "tall", "two_rows"))
  if method != "binary_connect":
    assert not np.allclose(blocked[-1][1].alpha["dense"], blocked[0][1].alpha["dense"])
  assert while_loops(make_tx(implementation="blocked"), params) == 4
  assert while_loops(make_tx(implementation="reference"), params) == 0


def test_full_size_blocks_and_default_block_size():
  params = make_params({"a": (300, 200), "b": (64, 1000)})
  compare(functools.partial(lab_optax.lab, 0.02), params, gradient_sequence(params, 10))


def test_eps_zero_with_zero_gradients_falls_back_to_mean_abs(small_blocks):
  params = make_params(SHAPES)
  grads = gradient_sequence(params, 8, zero_steps=3)
  for per_channel in (False, True):
    make_tx = functools.partial(lab_optax.lab, 0.05, eps=0.0, per_channel=per_channel)
    blocked, _ = compare(make_tx, params, grads)
    for p, s in blocked:
      assert all(np.isfinite(x).all() for x in jax.tree.leaves((p, s)))
    # After zero gradients d = 0 everywhere: alpha = mean(|w|) of the unchanged latent.
    p, s = blocked[0]
    mean_abs = np.mean(np.abs(s.latent["dense"]), axis=0 if per_channel else None)
    # A float32 sum of up to 851 terms, in an order that depends on the CPU, and alpha's
    # rounding to 22 bits (2.4e-7): 3.6e-7 apart here. The other fallbacks are off by O(1).
    np.testing.assert_allclose(np.squeeze(s.alpha["dense"]), mean_abs, rtol=1e-5)


def test_clip_none_and_traced_hyperparameters(small_blocks):
  params = make_params(SHAPES)
  grads = gradient_sequence(params, 20)
  compare(functools.partial(lab_optax.lab, 0.2, clip=None), params, grads)
  # Injected hyperparameters are traced: eps may be zero, so the blocked update
  # also sums |w| for the fallback of lab_scale.
  injected = optax.inject_hyperparams(lab_optax.lab)
  compare(functools.partial(injected, 0.05, eps=1e-8), params, grads)


NARROW = {
  "mu_bf16": {"mu_dtype": jnp.bfloat16},
  "latent_bf16": {"latent_dtype": jnp.bfloat16},
  "both_bf16": {"mu_dtype": jnp.bfloat16, "latent_dtype": jnp.bfloat16},
  "mu_f16": {"mu_dtype": jnp.float16},
}


@pytest.mark.parametrize(
  "method, options",
  grid(
    list(METHODS),
    list(NARROW),
    fast=[("lab", "both_bf16")],
  ),
)
def test_narrow_state_matches_reference(method, options, small_blocks):
  # 16-bit state is rounded when stored and the step uses the unrounded
  # moments, as in the reference: the blocked update computes everything from
  # the old rows and stores it rounded. A float32 rounding difference can move
  # a stored value by one unit of its 16-bit last place now and then.
  params = make_params({k: v for k, v in SHAPES.items() if k != "bias"})
  grads = gradient_sequence(params, 25)
  make = functools.partial(METHODS[method], 0.05, **NARROW[options])
  blocked = run(make(implementation="blocked"), params, grads)
  reference = run(make(implementation="reference"), params, grads)
  for (p, s), (p_ref, s_ref) in zip(blocked, reference):
    assert_two_values(p, s)
    for field in ("mu", "nu", "latent"):
      tree, tree_ref = optax.tree.get(s, field), optax.tree.get(s_ref, field)
      chex.assert_trees_all_equal_dtypes(tree, tree_ref)
      for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_ref)):
        narrow = x.dtype.itemsize == 2
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if narrow:
          np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-5)
          assert np.mean(x != y) < 0.01  # the rest are equal
        else:
          # A 16-bit moment one unit apart (allowed above) moves the float32
          # latent weight by up to lr * 2^-10 * |m / d| (5e-5 here).
          np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-5)
    chex.assert_trees_all_close(p, p_ref, rtol=1e-4)
  assert while_loops(make(implementation="blocked"), params) == len(params)


def test_bfloat16_params_and_float16_latent():
  # Bfloat16 params have bfloat16 moments and float32 latent weights: blocked.
  # A float16 latent weight keeps the reference, which takes the sign of a
  # weight too small for float16 from its unrounded value.
  params = make_params({"f32": (64, 32)})
  params["bf16"] = make_params({"bf16": (64, 32)}, jnp.bfloat16)["bf16"]
  grads = gradient_sequence(params, 15)
  blocked = run(lab_optax.lab(0.05, implementation="blocked"), params, grads)
  reference = run(lab_optax.lab(0.05, implementation="reference"), params, grads)
  # A bfloat16 moment one unit of its last place apart (4e-3) now and then moves the
  # latent weights of every later step by up to lr * 2**-7 (whether it happens depends
  # on the CPU's last bits: 1.2e-3 after 15 steps with XLA's default code here, 1.2e-7
  # with AVX code): the latent weights are held to 15 such steps, the signs where they
  # are farther from zero, and alpha to one unit of its bfloat16 grid.
  latent_atol = len(grads) * 0.05 * 2**-7
  previous = None
  for (p, s), (p_ref, s_ref) in zip(blocked, reference):
    assert_two_values(p, s)
    assert p["bf16"].dtype == jnp.bfloat16 and s.mu["bf16"].dtype == jnp.bfloat16
    chex.assert_trees_all_close(s.latent, s_ref.latent, rtol=1e-2, atol=latent_atol)
    assert_alphas_agree(p, s, s_ref, previous, rtol=1e-2)
    assert_params_agree(p, p_ref, s_ref, atol=latent_atol)
    previous = s_ref
  assert while_loops(lab_optax.lab(0.05, implementation="blocked"), params) == 2
  tx = lab_optax.lab(0.05, implementation="blocked", latent_dtype=jnp.float16)
  assert while_loops(tx, make_params({"w": (64, 32)})) == 0


def test_empty_one_row_and_custom_scale_leaves_use_the_reference():
  params = {"empty": jnp.zeros((0, 5)), "row": jnp.linspace(-1.0, 1.0, 12).reshape(1, 12)}
  mask = {"empty": True, "row": True}
  grads = gradient_sequence(params, 5)
  compare(functools.partial(lab_optax.lab, 0.05, mask=mask), params, grads)
  assert while_loops(lab_optax.lab(0.05, implementation="blocked"), params) == 0

  def mean_square(w, d, axis):  # a scale function fused.py does not know
    return jnp.sqrt(jnp.mean(jnp.square(w), axis=axis, keepdims=True))

  tx = lab_optax.projected_adam(0.05, scale_fn=mean_square, implementation="blocked")
  assert while_loops(tx, make_params({"w": (64, 32)})) == 0


def test_automatic_choice():
  big, small = make_params({"w": (256, 64)}), make_params({"w": (16, 16)})
  assert big["w"].size >= fused.MIN_ELEMENTS > small["w"].size
  assert jax.default_backend() == "cpu" and jax.device_count() == 1
  assert while_loops(lab_optax.lab(0.1), big) == 1
  assert while_loops(lab_optax.lab(0.1), small) == 0
  assert while_loops(lab_optax.lab(0.1, implementation="reference"), big) == 0
  for per_channel in (False, True):
    make_tx = functools.partial(lab_optax.lab, 0.05, per_channel=per_channel)
    compare(make_tx, big, gradient_sequence(big, 5))
  with pytest.raises(ValueError, match="implementation"):
    lab_optax.lab(0.1, implementation="fast")


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=3))
def test_one_after_is_one_whatever_the_bits(bits):
  # NaN, infinities, zeros of both signs and subnormals included: the
  # dependency it adds must never change a value.
  arrays = [jax.lax.bitcast_convert_type(jnp.full((2, 3), b, jnp.int32), jnp.float32) for b in bits]
  one = jax.jit(fused._one_after)(*arrays)
  assert one.dtype == jnp.int32 and int(one) == 1


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_pack_and_unpack_keep_every_term(count):
  terms = [jnp.full((2, 3), float(i + 1)) for i in range(count)]
  acc = fused._pack(terms)
  assert len(acc) == (count + 1) // 2
  assert [a.dtype for a in acc] == [jnp.complex64] * (count // 2) + [jnp.float32] * (count % 2)
  unpacked = fused._unpack(acc)
  assert len(unpacked) == count
  for got, want in zip(unpacked, terms):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


def test_blocks_shrink_with_many_leaves():
  assert fused.block_elements(1) == fused.BLOCK_ELEMENTS
  assert fused.block_elements(1000) * 16 * 1000 <= fused.TEMP_BYTES
  assert fused.block_elements(10**9) == 1


def test_state_updated_in_place_with_small_temporaries():
  # What the blocked update is for: on XLA:CPU no copy of a leaf and
  # temporaries within the budget, smaller than one leaf (the reference needs
  # several leaves' worth).
  shape = (2048, 1024)
  params = {f"w{i}": jnp.zeros(shape) for i in range(3)}
  # A conv kernel whose rows (3 * 3 * 64) the blocks do not divide: its last
  # block overlaps the one before.
  params["conv"] = jnp.zeros((3, 3, 64, 128))
  for method in METHODS.values():
    tx = method(0.1, eps=0.0, implementation="blocked")
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, g, tx=tx):
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    compiled = step.lower(params, state, params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= fused.TEMP_BYTES and temp < params["w0"].nbytes
    text = compiled.as_text()
    assert "f32[2048,1024]{1,0} copy(" not in text
    assert " copy(" not in "".join(line for line in text.splitlines() if "f32[3,3,64,128]" in line)
    assert "f32[576,128]{1,0} copy(" not in text


def loss_fn(params, x):
  h = jnp.tanh(x @ params["dense"])
  return jnp.mean((h @ params["out"] - 0.5) ** 2) + 1e-3 * jnp.sum(params["bias"] ** 2)


def train(tx, steps=8, grad_transform=lambda g, i: g):
  """Gradients of a loss at the current params, as in training."""
  params = make_params({"dense": (40, 24), "out": (24, 3), "bias": (3,)})
  x = jax.random.normal(jax.random.key(5), (16, 40))
  return train_steps(tx, params, loss_fn, x, steps, grad_transform)[2]


def poison(g, i):
  """Non-finite gradients every third step."""
  return {**g, "dense": g["dense"] + jnp.where(i % 3 == 2, jnp.nan, 0.0)}


@pytest.mark.parametrize(
  "wrap, grad_transform",
  [
    (lambda make: optax.chain(optax.clip_by_global_norm(1e-2), make(0.05)), None),
    (lambda make: optax.inject_hyperparams(make)(learning_rate=0.05), None),
    (lambda make: optax.MultiSteps(make(0.05), every_k_schedule=2), None),
    (lambda make: optax.apply_if_finite(make(0.05), 10), poison),
  ],
  ids=["chain", "inject_hyperparams", "multi_steps", "apply_if_finite"],
)
def test_compositions(wrap, grad_transform, small_blocks):
  runs = {}
  for implementation in ("blocked", "reference"):
    make = functools.partial(lab_optax.lab, implementation=implementation)
    runs[implementation] = train(wrap(make), grad_transform=grad_transform or (lambda g, i: g))
  for (p, s), (p_ref, _) in zip(runs["blocked"], runs["reference"]):
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p))
    assert_two_values(p, s)
    # The gradient depends on the params, so alpha's rounding feeds back.
    chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-6)


# Sharded: 8 simulated devices in a child process (the device count is fixed
# once JAX starts), reusing sharding_check.py with the blocked update forced.
SHARDING_SCRIPT = """
import functools, json, sys
import jax
import lab_optax
import sharding_check as check

for name, make in list(check.METHODS.items()):
  check.METHODS[name] = functools.partial(make, implementation="blocked")
cases = {name: check.case(name) for name in sys.argv[1:]}
# With several devices the automatic choice keeps the reference update.
params, _, _ = check.make_problem()
tx = lab_optax.lab(0.1)
hlo = jax.jit(lambda p, s: tx.update(p, s, p)).lower(params, tx.init(params)).compile().as_text()
print(json.dumps({"devices": jax.device_count(), "cases": cases, "auto_while": hlo.count(" while(")}))
"""
SHARDED_CASES = (
  "auto/fully_sharded/lab",
  "auto/per_channel/lab",
  "auto/data_parallel/bwn",
  "explicit/fully_sharded/lab",
)


# test_sharding.py runs the automatic choice sharded by default; the blocked
# update forced onto sharded leaves is in the slow run.
@pytest.mark.slow
def test_blocked_update_under_sharding_matches_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  tests_dir = Path(__file__).parent
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests_dir), env.get("PYTHONPATH")]))
  proc = subprocess.run(
    [sys.executable, "-c", SHARDING_SCRIPT, *SHARDED_CASES],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["auto_while"] == 0
  for name in SHARDED_CASES:
    result = out["cases"][name]
    assert result["count"] > 1 and result["moved"]
    assert max(result["errors"].values()) < 2e-4, (name, result["errors"])
    assert result["sharding_mismatches"] == []
    assert result["two_values"]


@pytest.mark.slow  # differentiating through the update: beyond the default run's budget
def test_reverse_mode_derivatives_are_the_references():
  # The blocked loop is a while_loop, which has no reverse-mode derivative: it
  # is differentiated as the reference (hypergradients of the learning rate).
  params = make_params({"w": (64, 70)})
  grads = gradient_sequence(params, 2)

  def latent_norm(lr, implementation):
    tx = lab_optax.lab(lr, implementation=implementation)
    state = tx.init(params)
    p = lab_optax.binarize_params(params, state)
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return jnp.sum(state.latent["w"] ** 2) + jnp.sum(p["w"])

  values = {}
  for implementation in ("blocked", None, "reference"):
    values[implementation] = jax.value_and_grad(latent_norm)(0.05, implementation)
  for implementation in ("blocked", None):
    chex.assert_trees_all_close(values[implementation], values["reference"], rtol=1e-5)
  # Forward mode too.
  tangent = jax.jvp(lambda lr: latent_norm(lr, "blocked"), (0.05,), (1.0,))[1]
  np.testing.assert_allclose(tangent, values["reference"][1], rtol=1e-5)


def test_vmap_matches_reference_with_an_unbatched_loop():
  # Under vmap (an ensemble of models) the loop's counter stays unbatched: a
  # batched counter makes the loop's condition batched, and JAX then runs it
  # with a select over the whole carry on every iteration.
  params = jax.vmap(lambda k: jax.random.uniform(k, (64, 70), minval=-0.5, maxval=0.5))(
    jax.random.split(jax.random.key(0), 3)
  )
  g = jax.random.normal(jax.random.key(1), params.shape)
  out = {}
  for implementation in ("blocked", "reference"):
    tx = lab_optax.lab(0.05, implementation=implementation)
    state = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(lambda p, s, g, tx=tx: tx.update(g, s, p)))
    out[implementation] = step(params, state, g)
    if implementation == "blocked":
      text = step.lower(params, state, g).compile().as_text()
      (loop,) = [line for line in text.splitlines() if " while(" in line]
      carry = loop.split(" while(")[0]
      assert "s32[]" in carry and "pred[]" in carry  # an unbatched counter and condition
      assert "s32[3]" not in carry and "pred[3]" not in carry
  chex.assert_trees_all_close(out["blocked"], out["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_overflowing_d_gives_no_step_as_in_the_reference(method):
  # With a gradient of 1e20 at step 1, v / bc2 overflows: d is inf and the
  # element takes no step, in both updates.
  params = make_params({"w": (64, 64)})
  g = {"w": jnp.zeros((64, 64)).at[0, 0].set(1e20)}
  history = {}
  for implementation in ("blocked", "reference"):
    history[implementation] = run(
      METHODS[method](0.1, clip=None, implementation=implementation), params, [g]
    )
  (p, s), (p_ref, s_ref) = history["blocked"][0], history["reference"][0]
  np.testing.assert_array_equal(s.latent["w"][0, 0], s_ref.latent["w"][0, 0])
  np.testing.assert_array_equal(np.isfinite(s.alpha["w"]), np.isfinite(s_ref.alpha["w"]))
  chex.assert_trees_all_close(p, p_ref, rtol=1e-5)


def test_float64_hyperparameters_under_x64():
  script = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, lab_optax
w = jax.random.uniform(jax.random.key(0), (64, 64), jnp.float32, -0.5, 0.5)
g = jax.random.normal(jax.random.key(1), (64, 64), jnp.float32)
out = {}
for impl in ("blocked", "reference"):
  tx = lab_optax.lab(np.float64(0.1), b1=np.float64(0.9), eps=np.float64(1e-8), implementation=impl)
  s = tx.init(w)
  u, s = jax.jit(tx.update)(g, s, lab_optax.binarize_params(w, s))
  out[impl] = (u, s)
  assert s.mu.dtype == s.nu.dtype == s.latent.dtype == jnp.float32, impl
np.testing.assert_allclose(out["blocked"][1].latent, out["reference"][1].latent, rtol=1e-5, atol=1e-6)
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# Beyond one bit: the blocked solvers of LATa, LAQ, TWN and absmean
# (Projection.blocked_solver), against the reference path.
LOW_BIT = {
  "lat": lab_optax.lat,  # rounds=0
  "lat_rounds1": functools.partial(lab_optax.lat, rounds=1),
  "lat_rounds10": functools.partial(lab_optax.lat, rounds=10),
  "laq": lab_optax.laq,
  "laq_log4": functools.partial(lab_optax.laq, bits=4, levels="log"),
  "twn": lab_optax.twn,
  "absmean": lab_optax.absmean_ternary,
}


def assert_on_level_set(params, state):
  """Params are exactly what quantize_params rebuilds from the state (codes times scales)."""
  rebuilt = lab_optax.quantize_params(params, state)
  for name, p in params.items():
    np.testing.assert_array_equal(np.asarray(p), np.asarray(rebuilt[name]), err_msg=name)


def assert_low_bit_runs_agree(blocked, reference, narrow=False):
  """Moments and latent weights as for LAB; scales to rounding (their sums' order, and a
  round that stops one round apart when alpha moves by about tol); codes may differ only
  for the few weights at a threshold, where the two unrounded scales fall on either side."""
  for (p, s), (p_ref, s_ref) in zip(blocked, reference):
    if not narrow:  # 16-bit latent weights: the codes are those of the unrounded ones
      assert_on_level_set(p, s)
    for field in ("mu", "nu", "latent"):
      for x, y in zip(
        jax.tree.leaves(optax.tree.get(s, field)), jax.tree.leaves(optax.tree.get(s_ref, field))
      ):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if narrow and x.dtype.itemsize == 2:
          np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-5)
        else:
          np.testing.assert_allclose(
            x, y, rtol=1e-2 if narrow else 1e-5, atol=1e-5 if narrow else 1e-6
          )
    for name, a in s.alpha.items():
      if isinstance(a, optax.MaskedNode):
        continue
      np.testing.assert_allclose(a, s_ref.alpha[name], rtol=1e-2 if narrow else 1e-4, err_msg=name)
      close = np.isclose(
        np.asarray(p[name], np.float32),
        np.asarray(p_ref[name], np.float32),
        rtol=1e-2 if narrow else 1e-4,
        atol=1e-7,
      )
      assert np.sum(~close) <= max(1, 0.01 * close.size), (name, np.sum(~close))


def uses_blocks(make_tx, params, guard_zero_d=False):
  tx = make_tx(implementation="blocked")
  state = tx.init(params)
  projection = state.projection
  return {
    name: fused.supports(
      projection, state.mu[name], state.nu[name], state.latent[name], guard_zero_d
    )
    for name in params
    if not isinstance(state.latent[name], optax.MaskedNode)
  }


@pytest.mark.parametrize(
  "per_channel, method",
  grid(
    [False, True],
    list(LOW_BIT),
    # absmean: test_low_bit_narrow_state by default.
    fast=[(True, "lat"), (False, "lat_rounds10"), (False, "laq"), (False, "twn")],
  ),
)
def test_low_bit_matches_reference_over_many_steps(method, per_channel, small_blocks):
  params = make_params(SHAPES)
  grads = gradient_sequence(params, 30)
  make_tx = functools.partial(LOW_BIT[method], 0.05, per_channel=per_channel)
  assert all(uses_blocks(make_tx, params).values())
  blocked = run(make_tx(implementation="blocked"), params, grads)
  reference = run(make_tx(implementation="reference"), params, grads)
  assert_low_bit_runs_agree(blocked, reference)
  # The scales moved and some codes are 0.
  assert not np.allclose(blocked[-1][1].alpha["dense"], blocked[0][1].alpha["dense"])
  assert np.any(blocked[-1][0]["dense"] == 0)


@pytest.mark.parametrize(
  "options, method",
  grid(
    ["mu_bf16", "both_bf16"],
    ["lat", "absmean", "lat_rounds10", "twn"],
    fast=[("both_bf16", "absmean"), ("mu_bf16", "lat_rounds10")],
  ),
)
def test_low_bit_narrow_state(method, options, small_blocks):
  # Solvers with no pass after the update loop (absmean, LATa with rounds=0)
  # take 16-bit state; the others read the stored latent weights again, which
  # 16-bit state rounds, and keep the reference for it.
  params = make_params({k: v for k, v in SHAPES.items() if k != "bias"})
  make_tx = functools.partial(LOW_BIT[method], 0.05, **NARROW[options])
  blocks = uses_blocks(make_tx, params)
  assert all(blocks.values()) == (method in ("lat", "absmean"))
  grads = gradient_sequence(params, 20)
  blocked = run(make_tx(implementation="blocked"), params, grads)
  reference = run(make_tx(implementation="reference"), params, grads)
  assert_low_bit_runs_agree(blocked, reference, narrow=True)


def test_low_bit_solvers_that_keep_the_reference():
  params = make_params({"w": (64, 32)})
  for make_tx, guard_zero_d in (
    (functools.partial(lab_optax.lat, solver="exact"), False),  # LATe: a sort
    (functools.partial(lab_optax.lat, scales=2), False),  # LAT2
    (lab_optax.lat, True),  # eps = 0: d may vanish, for LATa and LAQ
    (lab_optax.laq, True),
  ):
    uses = uses_blocks(functools.partial(make_tx, 0.1), params, guard_zero_d)
    assert not any(uses.values())
  state = lab_optax.lat(0.1, eps=0.0).init(params)
  assert not fused.use_blocked(
    "blocked", state.projection, params["w"], params["w"], params["w"], True
  )
  # TWN and absmean ignore d: blocked whatever eps.
  for make_tx in (lab_optax.twn, lab_optax.absmean_ternary):
    state = make_tx(0.1, eps=0.0).init(params)
    assert fused.use_blocked(
      "blocked", state.projection, params["w"], params["w"], params["w"], True
    )


@pytest.mark.parametrize("method", ["lat", "laq", "twn", "absmean"])
def test_low_bit_state_updated_in_place(method):
  shape = (2048, 1024)
  params = {f"w{i}": jnp.zeros(shape) for i in range(2)}
  tx = LOW_BIT[method](0.1, implementation="blocked")
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  compiled = step.lower(params, state, params).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= fused.TEMP_BYTES
  text = compiled.as_text()
  assert "f32[2048,1024]{1,0} copy(" not in text
  assert " gather(" not in text and " sort(" not in text

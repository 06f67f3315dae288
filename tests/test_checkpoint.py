"""Optimizer states save and restore with orbax, and resuming is bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import lab_optax

STEPS, SAVE_AT = 6, 3


def make_params(seed, with_int=True):
  rng = np.random.default_rng(seed)
  params = {
    "dense": jnp.asarray(rng.uniform(-0.5, 0.5, (6, 5)), jnp.float32),
    "conv": jnp.asarray(rng.uniform(-0.5, 0.5, (3, 3, 2, 5)), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  if with_int:
    params["steps"] = jnp.arange(3, dtype=jnp.int32)
  return params


def loss_fn(params, x):
  h = jnp.tanh(x @ params["dense"] + params["bias"])
  return jnp.mean((h - 0.5) ** 2) + 1e-2 * jnp.mean(params["conv"] * h[:, None, None, None, :])


def assert_bitwise(actual, expected):
  """Same tree (wrappers, NamedTuples, MaskedNode leaves), same shapes, dtypes and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), strict=True)


def batch(i):
  return jnp.asarray(np.random.default_rng(100 + i).normal(size=(8, 6)), jnp.float32)


# name: (optimizer, whether params hold an integer leaf). optax's own wrappers
# (clipping, MultiSteps) cannot take the gradients of integer leaves.
OPTIMIZERS = {
  "lab": (lambda: lab_optax.lab(0.05), True),
  "chain_inject_schedule": (
    lambda: optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(lab_optax.lab)(learning_rate=optax.exponential_decay(0.05, 2, 0.5)),
    ),
    False,
  ),
  "inject_bwn_per_channel_masked": (
    lambda: optax.inject_hyperparams(lab_optax.bwn, static_args="mask")(
      0.05, per_channel=True, mask=lambda p: {k: k == "conv" for k in p}
    ),
    True,
  ),
  "multi_steps_binary_connect": (
    lambda: optax.MultiSteps(lab_optax.binary_connect(0.05), every_k_schedule=2),
    False,
  ),
}


def fresh(name, seed):
  """A new optimizer, its initial (params, opt_state) and a new jitted step."""
  make_tx, with_int = OPTIMIZERS[name]
  tx = make_tx()
  params = make_params(seed, with_int)
  opt_state = tx.init(params)
  params = lab_optax.binarize_params(params, opt_state)

  @jax.jit
  def step(params, opt_state, x):
    floats = {k: v for k, v in params.items() if k != "steps"}
    grads = jax.grad(loss_fn)(floats, x)
    if "steps" in params:
      grads["steps"] = jnp.zeros_like(params["steps"])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return (params, opt_state), step


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_from_orbax_checkpoint_is_bit_identical(tmp_path, name):
  (params, opt_state), step = fresh(name, seed=0)
  history = []
  with ocp.StandardCheckpointer() as checkpointer:
    for i in range(STEPS):
      params, opt_state = step(params, opt_state, batch(i))
      history.append((params, opt_state))
      if i + 1 == SAVE_AT:
        checkpointer.save(tmp_path / "ckpt", (params, opt_state))

  # A fresh start from other initial weights, restored into the structure of
  # its own state: only the checkpoint can make it agree with the first run.
  (params, opt_state), step = fresh(name, seed=1)
  assert not np.array_equal(params["dense"], history[SAVE_AT - 1][0]["dense"])
  target = jax.eval_shape(lambda: fresh(name, seed=1)[0])
  with ocp.StandardCheckpointer() as checkpointer:
    params, opt_state = checkpointer.restore(tmp_path / "ckpt", target)
  saved = history[SAVE_AT - 1]
  assert_bitwise((params, opt_state), saved)
  latent = lab_optax.latent_weights(opt_state)
  assert any(isinstance(w, optax.MaskedNode) for w in latent.values())
  for i in range(SAVE_AT, STEPS):
    params, opt_state = step(params, opt_state, batch(i))
    assert_bitwise((params, opt_state), history[i])
  # The steps after the checkpoint change the params: the comparison is not vacuous.
  assert not np.array_equal(history[-1][0]["bias"], saved[0]["bias"])


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(6, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def make_nnx(seed):
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, lab_optax.lab(0.01), wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  nnx.update(model, lab_optax.binarize_params(params, nnx.as_pure(optimizer.opt_state)))
  return model, optimizer


@nnx.jit
def nnx_step(model, optimizer, x):
  y = jnp.sin(x[:, :1])
  grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)


def pure(model, optimizer):
  return nnx.as_pure((nnx.state(model), nnx.state(optimizer)))


def test_nnx_optimizer_resumes_bit_identical(tmp_path):
  model, optimizer = make_nnx(seed=0)
  history = []
  with ocp.StandardCheckpointer() as checkpointer:
    for i in range(STEPS):
      nnx_step(model, optimizer, batch(i))
      history.append(pure(model, optimizer))
      if i + 1 == SAVE_AT:
        checkpointer.save(
          tmp_path / "ckpt", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        )

  model, optimizer = make_nnx(seed=1)
  abstract_model, abstract_optimizer = nnx.eval_shape(lambda: make_nnx(seed=1))
  target = {"model": nnx.state(abstract_model), "optimizer": nnx.state(abstract_optimizer)}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", target)
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])
  assert_bitwise(pure(model, optimizer), history[SAVE_AT - 1])
  assert isinstance(optimizer.opt_state.latent["l1"]["bias"].get_value(), optax.MaskedNode)
  for i in range(SAVE_AT, STEPS):
    nnx_step(model, optimizer, batch(i))
    assert_bitwise(pure(model, optimizer), history[i])
  assert not np.array_equal(history[-1][0]["l1"]["kernel"], history[SAVE_AT - 1][0]["l1"]["kernel"])
  kernel = np.asarray(model.l1.kernel[...])
  assert len(np.unique(np.abs(kernel))) == 1

"""Sharded runs of lab, bwn and binary_connect held against one-device runs.

``test_sharding.py`` runs this script in a child process with 8 simulated CPU
devices; by hand::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py [CASE ...]

where a case is ``auto|explicit/fully_sharded|per_channel|data_parallel/METHOD``
(the mesh's axis type, the layout, the optimizer); none runs them all. For every case it trains the same model on the same data for ``STEPS`` jitted
steps, once with params, optimizer state and batch spread over a mesh and once
on a single device, and prints one JSON object: per case, the largest
differences between the two runs, the state leaves whose sharding differs from
their param's, and how far a per-shard alpha would be from the whole-tensor one.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lab_optax

STEPS = 10
LR = 0.02
METHODS = {"lab": lab_optax.lab, "bwn": lab_optax.bwn, "binary_connect": lab_optax.binary_connect}
# Row blocks of the kernels differ in magnitude by orders of ten, so the
# shards of a kernel split along its rows would each get a different alpha.
BLOCK_SCALES = (1e-3, 1e-2, 0.1, 0.9)


def blocked(rng, shape):
  w = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
  blocks = np.array_split(np.arange(shape[0]), len(BLOCK_SCALES))
  for rows, scale in zip(blocks, BLOCK_SCALES):
    w[rows] *= scale
  return w


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "k1": blocked(rng, (16, 8)),
    "b1": rng.normal(size=(8,)).astype(np.float32) * 0.1,
    "k2": blocked(rng, (8, 4)),
    "b2": np.zeros((4,), np.float32),
  }
  # Batch rows also differ in scale from one data shard to the next.
  x = rng.normal(size=(32, 16)).astype(np.float32) * np.repeat(2.0 ** np.arange(8), 4)[:, None]
  y = np.tanh(x @ rng.normal(size=(16, 4))).astype(np.float32)
  return params, x, y


def loss_fn(params, x, y, gather=None):
  if gather is not None:  # Explicit mesh axes: all-gather the weights before use (FSDP).
    params = jax.sharding.reshard(params, jax.tree.map(lambda _: gather, params))
  h = jnp.tanh(x @ params["k1"] + params["b1"])
  return jnp.mean((h @ params["k2"] + params["b2"] - y) ** 2)


def run(tx, params, x, y, gather=None, check_eager_init=False):
  """``STEPS`` jitted steps; returns numpy snapshots and the state-sharding mismatches."""
  mismatches = set()

  def check(where, params, state):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    for field in ("mu", "nu", "latent"):
      for (path, p), s in zip(flat, treedef.flatten_up_to(optax.tree.get(state, field))):
        if isinstance(s, optax.MaskedNode):
          continue
        if not s.sharding.is_equivalent_to(p.sharding, p.ndim):
          mismatches.add(f"{where}: {field}{jax.tree_util.keystr(path)}")

  if check_eager_init:
    check("eager init", params, tx.init(params))
  state = jax.jit(tx.init)(params)
  check("jit init", params, state)
  params = jax.jit(lab_optax.binarize_params)(params, state)
  shardings = jax.tree.map(lambda p: p.sharding, params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y, gather)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for i in range(STEPS):
    params, state = step(params, state, x, y)
    check(f"step {i + 1}", params, state)
    for name, p in params.items():
      if not p.sharding.is_equivalent_to(shardings[name], p.ndim):
        mismatches.add(f"step {i + 1}: params['{name}']")
    history.append(jax.tree.map(np.asarray, (params, state)))
  return history, state, sorted(mismatches)


def scaled_error(a, b):
  """Largest |a - b| over the largest |b|, for two pytrees of arrays."""
  worst = 0.0
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if v.size:
      worst = max(worst, float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30)))
  return worst


def binary_values_ok(params, binarized, per_channel):
  """Every binarized leaf holds one |value| per tensor (or per output channel)."""
  for name in binarized:
    a = np.abs(params[name])
    columns = a.reshape(-1, a.shape[-1]).T if per_channel else a.reshape(1, -1)
    if any(len(np.unique(c)) != 1 for c in columns):
      return False
  return True


def per_shard_alpha_spread(state, method, per_channel):
  """How far alpha computed on each shard alone is from the whole-tensor alpha."""
  latents, alphas, nus = (optax.tree.get(state, f) for f in ("latent", "alpha", "nu"))
  bc2 = 1 - 0.999 ** int(optax.tree.get(state, "count"))
  spread = 0.0
  for name, latent in latents.items():
    if isinstance(latent, optax.MaskedNode):
      continue
    full = np.asarray(alphas[name])
    nu_shards = {s.device: np.asarray(s.data) for s in nus[name].addressable_shards}
    for shard in latent.addressable_shards:
      w = np.abs(np.asarray(shard.data, np.float64))
      d = np.sqrt(nu_shards[shard.device] / bc2) + 1e-8
      axis = 0 if per_channel else None
      if method == "lab":  # Theorem 3.1 on the shard alone
        alpha = np.sum(d * w, axis=axis) / np.sum(d, axis=axis)
      elif method == "bwn":
        alpha = np.mean(w, axis=axis)
      else:  # BinaryConnect has no scale to reduce
        continue
      ref = full[shard.index[-1]] if per_channel else full
      spread = max(spread, float(np.max(np.abs(alpha - ref) / ref)))
  return spread


@functools.cache
def single_device_run(method, per_channel):
  params, x, y = make_problem()
  one = jax.devices()[0]
  make_tx = METHODS[method]
  history, _, _ = run(make_tx(LR, per_channel=per_channel), *jax.device_put((params, x, y), one))
  return history


# name: (mesh shape, axis names, param specs, batch spec, per_channel)
LAYOUTS = {
  # (a) Fully sharded: kernels split over both mesh axes or one, biases over one or none.
  "fully_sharded": (
    (4, 2),
    ("x", "y"),
    {"k1": P("x", "y"), "b1": P("y"), "k2": P("x", None), "b2": P()},
    P("x"),
    False,
  ),
  # One alpha per output channel; k1 split along its channels only, k2 along rows and channels.
  "per_channel": (
    (4, 2),
    ("x", "y"),
    {"k1": P(None, ("x", "y")), "b1": P(("x", "y")), "k2": P("x", "y"), "b2": P("y")},
    P(),
    True,
  ),
  # (b) Data parallel: replicated params, batch split over 'data'.
  "data_parallel": (
    (8,),
    ("data",),
    {"k1": P(), "b1": P(), "k2": P(), "b2": P()},
    P("data"),
    False,
  ),
}
CASES = [
  f"{kind}/{layout}/{method}"
  for kind in ("auto", "explicit")
  for layout in LAYOUTS
  for method in METHODS
]


def case(name):
  """Runs one case ``axis_type/layout/method`` and compares it with one device."""
  kind, layout, method = name.split("/")
  shape, axes, specs, batch_spec, per_channel = LAYOUTS[layout]
  axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[kind]
  mesh = jax.make_mesh(shape, axes, (axis_type,) * len(axes))

  def put(tree, spec):
    return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), spec))

  params, x, y = make_problem()
  params, x, y = put(params, specs), put(x, batch_spec), put(y, batch_spec)
  assert x.sharding.spec == batch_spec, x.sharding
  gather = NamedSharding(mesh, P()) if axis_type == AxisType.Explicit else None
  tx = METHODS[method](LR, per_channel=per_channel)
  history, state, mismatches = run(tx, params, x, y, gather, check_eager_init=method == "lab")
  single = single_device_run(method, per_channel)

  binarized = [k for k, v in history[-1][1].latent.items() if not isinstance(v, optax.MaskedNode)]
  errors = {"params": 0.0, "mu": 0.0, "nu": 0.0, "latent": 0.0, "alpha": 0.0}
  two_values = True
  for (p, s), (p1, s1) in zip(history, single):
    errors["params"] = max(errors["params"], scaled_error(p, p1))
    for field in ("mu", "nu", "latent", "alpha"):
      errors[field] = max(errors[field], scaled_error(getattr(s, field), getattr(s1, field)))
    two_values &= binary_values_ok(p, binarized, per_channel)
  return {
    "errors": errors,
    "binarized": binarized,
    "two_values": bool(two_values),
    "sharding_mismatches": mismatches,
    "per_shard_alpha_spread": per_shard_alpha_spread(state, method, per_channel),
    "count": int(history[-1][1].count),
    "moved": bool(any(not np.array_equal(history[0][0][k], history[-1][0][k]) for k in binarized)),
  }


def main(names):
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.devices()}"
  unknown = set(names) - set(CASES)
  assert not unknown, f"unknown cases {sorted(unknown)}; known: {CASES}"
  results = {name: case(name) for name in names or CASES}
  print(json.dumps({"devices": jax.device_count(), "steps": STEPS, "cases": results}))


if __name__ == "__main__":
  main(sys.argv[1:])

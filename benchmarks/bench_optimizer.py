"""Speed and state memory of lab_optax's optimizers against optax.adam.

Run from the repository root::

  python benchmarks/bench_optimizer.py [--json results.json] [--runs 50] [--part a|b|new|all]

Part (a) times one optimizer step, ``tx.update`` followed by
``optax.apply_updates``, jitted with the params and the optimizer state donated,
on a tree of 5 dense layers (1000 x 2000 float32 kernels with biases, 10.01M
parameters). ``lab_optax.lab`` (with the automatic choice of implementation,
and with ``implementation="reference"``), its ``mu_dtype`` / ``latent_dtype``
options, ``bwn`` and ``binary_connect`` are held against ``optax.adam``: all
compiled first, then called in turn, call by call, ``--runs`` times; each
figure is the median. It also reports the bytes of the optimizer state's leaves
and the bytes of temporaries XLA allocates per call.

Part (b) times a full training step of the paper's MNIST MLP
(784-2048-2048-2048-10, batch norm after every layer, batch 100): the jitted
``_train_step`` of ``lab_optax.experiments.train`` on the pure state of
``(model, optimizer)``, for the LAB model against the full-precision model
trained with Adam, interleaved the same way. A third model, LAB with kernels
that the layers do not pass through ``binarize_ste`` (the optimizer already
keeps them binary, so the forward pass computes the same), measures what the
forward pass's binarization check costs.

``--part new`` runs both parts for the optimizers beyond one bit (``lat`` with
its approximate and exact solvers and bounded rounds, ``laq``, ``twn``,
``absmean_ternary``) beside ``optax.adam`` and ``lab``. In part (b) their
models are built with plain layers (the kernels used as the optimizer keeps
them, as for "LAB without binarize_ste"): the binary layers would put a ternary
or m-bit kernel through ``binarize_ste``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from machine import cpu_name

import lab_optax
from lab_optax._src import fused
from lab_optax.experiments.models import METHODS, MLP, squared_hinge
from lab_optax.experiments.train import _train_step
from lab_optax.nnx import binarize_model, binary_mask


def interleaved_medians(calls: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
  """Median seconds per call; the calls take turns so that load changes hit all alike."""
  times = {name: [] for name in calls}
  for _ in range(runs):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------
# Part (a): one optimizer step on 10M parameters.

LAYERS, FAN_IN, FAN_OUT = 5, 1000, 2000


def dense_tree(key: jax.Array) -> dict:
  params = {}
  for i in range(LAYERS):
    key, sub = jax.random.split(key)
    limit = np.sqrt(1.5 / (FAN_IN + FAN_OUT))
    params[f"dense{i}"] = {
      "kernel": jax.random.uniform(sub, (FAN_IN, FAN_OUT), minval=-limit, maxval=limit),
      "bias": jnp.zeros(FAN_OUT),
    }
  return params


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "optax.adam": lambda: optax.adam(1e-3),
  "lab": lambda: lab_optax.lab(1e-3),
  "lab, implementation='reference'": lambda: lab_optax.lab(1e-3, implementation="reference"),
  "lab, mu_dtype=bfloat16": lambda: lab_optax.lab(1e-3, mu_dtype=jnp.bfloat16),
  "lab, latent_dtype=bfloat16": lambda: lab_optax.lab(1e-3, latent_dtype=jnp.bfloat16),
  "lab, both bfloat16": lambda: lab_optax.lab(
    1e-3, mu_dtype=jnp.bfloat16, latent_dtype=jnp.bfloat16
  ),
  "bwn": lambda: lab_optax.bwn(1e-3),
  "binary_connect": lambda: lab_optax.binary_connect(1e-3),
}


# Beyond one bit (``--part new``): each new optimizer with its defaults, and
# with bounded rounds of its approximate solver.
NEW_OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "optax.adam": lambda: optax.adam(1e-3),
  "lab": lambda: lab_optax.lab(1e-3),
  "lat (LATa, 10 rounds)": lambda: lab_optax.lat(1e-3),
  "lat, rounds=1": lambda: lab_optax.lat(1e-3, rounds=1),
  "lat, rounds=0": lambda: lab_optax.lat(1e-3, rounds=0),
  "lat, solver='exact'": lambda: lab_optax.lat(1e-3, solver="exact"),
  "laq (3 bits, 10 rounds)": lambda: lab_optax.laq(1e-3),
  "laq, rounds=1": lambda: lab_optax.laq(1e-3, rounds=1),
  "twn": lambda: lab_optax.twn(1e-3),
  "absmean_ternary": lambda: lab_optax.absmean_ternary(1e-3),
  "lat, implementation='reference'": lambda: lab_optax.lat(1e-3, implementation="reference"),
}


def _step_call(tx, params0, grads, block: int | None = None):
  """A jitted, donated step of ``tx`` and its compiled form, settled by a few calls.

  ``block`` overrides ``fused.BLOCK_ELEMENTS`` while the step is traced.
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.copy, params0)
  opt_state = tx.init(params)
  if isinstance(opt_state, lab_optax.ProjectedAdamState):
    params = lab_optax.binarize_params(params, opt_state)
  default = fused.BLOCK_ELEMENTS
  fused.BLOCK_ELEMENTS = block or default
  try:
    compiled = step.lower(params, opt_state, grads).compile()
  finally:
    fused.BLOCK_ELEMENTS = default
  box = [params, opt_state]

  def call():
    box[0], box[1] = compiled(box[0], box[1], grads)
    jax.block_until_ready(box)

  for _ in range(3):  # settle
    call()
  return call, compiled, opt_state


def _tree_and_grads():
  params0 = dense_tree(jax.random.key(0))
  grads = jax.tree.map(
    lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params0
  )
  return params0, grads


def optimizer_step(runs: int, optimizers=None) -> list[dict]:
  params0, grads = _tree_and_grads()
  calls, rows = {}, {}
  for name, make in (optimizers or OPTIMIZERS).items():
    call, compiled, opt_state = _step_call(make(), params0, grads)
    rows[name] = {
      "optimizer": name,
      "state_bytes": state_bytes(opt_state),
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
    }
    calls[name] = call
  medians = interleaved_medians(calls, runs)
  adam = rows["optax.adam"]
  for name, row in rows.items():
    row["ms"] = 1e3 * medians[name]
    row["time_vs_adam"] = medians[name] / medians["optax.adam"]
    row["state_vs_adam"] = row["state_bytes"] / adam["state_bytes"]
  return list(rows.values())


BLOCK_SIZES = tuple(1 << k for k in range(12, 19))


def block_sweep(runs: int) -> list[dict]:
  """Part (a)'s step of ``lab`` with blocked updates of 2**12 to 2**18 elements per block."""
  params0, grads = _tree_and_grads()
  calls = {"optax.adam": _step_call(optax.adam(1e-3), params0, grads)[0]}
  for block in BLOCK_SIZES:
    tx = lab_optax.lab(1e-3, implementation="blocked")
    calls[f"lab, blocks of 2^{block.bit_length() - 1}"] = _step_call(tx, params0, grads, block)[0]
  medians = interleaved_medians(calls, runs)
  return [
    {"optimizer": name, "ms": 1e3 * t, "time_vs_adam": t / medians["optax.adam"]}
    for name, t in medians.items()
  ]


# ---------------------------------------------------------------------------
# Part (b): a training step of the paper's MNIST MLP.

BATCH = 100


def loss_fn(outputs, batch):
  return squared_hinge(outputs, batch[1])


def mlp_state(method_name: str, binarize_kernel: bool = True, optimizer=None, **options):
  """``(graphdef, state)`` of ``(model, optimizer)`` as ``train.run`` builds them.

  ``options`` go to the lab_optax optimizer (``implementation=...``);
  ``optimizer`` replaces the method's (with the binarized method's model).
  """
  method = METHODS[method_name]
  if optimizer is not None:
    method = dataclasses.replace(method, optimizer=optimizer)
  model = MLP(784, 10, method=method, rngs=nnx.Rngs(0))
  mask_model = model
  if not binarize_kernel:
    # Plain layers; the optimizer's mask comes from the binary model, whose
    # params have the same paths, so the same kernels are binarized.
    plain = dataclasses.replace(method, binary_weights=False)
    model = MLP(784, 10, method=plain, rngs=nnx.Rngs(0))
  lr = 0.01
  if method.optimizer is None:
    tx = optax.adam(lr)
  else:
    tx = method.optimizer(lr, mask=binary_mask(mask_model), **options)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if method.optimizer is not None:
    binarize_model(model, optimizer)
  model.train()
  return nnx.split((model, optimizer))


def _new_models() -> dict:
  """Part (b)'s models for ``--part new``: plain layers, kernels as the optimizer keeps them."""

  def plain(optimizer, **options):
    return mlp_state("lab", binarize_kernel=False, optimizer=optimizer, **options)

  return {
    "FP (optax.adam)": mlp_state("fp"),
    "LAB": mlp_state("lab"),
    "LAT (LATa, 10 rounds)": plain(lab_optax.lat),
    "LAT, rounds=1": plain(functools.partial(lab_optax.lat, rounds=1)),
    "LAT, rounds=0": plain(functools.partial(lab_optax.lat, rounds=0)),
    "LAT, solver='exact'": plain(functools.partial(lab_optax.lat, solver="exact")),
    "LAQ (3 bits, 10 rounds)": plain(lab_optax.laq),
    "TWN": plain(lab_optax.twn),
    "absmean_ternary": plain(lab_optax.absmean_ternary),
  }


def training_step(runs: int, new: bool = False) -> list[dict]:
  rng = np.random.default_rng(0)
  batch = (
    jnp.asarray(rng.uniform(size=(BATCH, 28, 28, 1)), jnp.float32),
    jnp.asarray(rng.integers(0, 10, size=BATCH), jnp.int32),
  )
  if new:
    models = _new_models()
  else:
    models = {
      "FP (optax.adam)": mlp_state("fp"),
      "LAB": mlp_state("lab"),
      "LAB without binarize_ste": mlp_state("lab", binarize_kernel=False),
      "LAB, implementation='reference'": mlp_state("lab", implementation="reference"),
    }
  calls = {}
  for name, (graphdef, state) in models.items():
    box = [state]

    def call(graphdef=graphdef, box=box):
      box[0], loss = _train_step(graphdef, loss_fn, box[0], batch)
      jax.block_until_ready((box[0], loss))

    for _ in range(3):
      call()
    calls[name] = call
  medians = interleaved_medians(calls, runs)
  fp = medians["FP (optax.adam)"]
  return [
    {"model": name, "ms": 1e3 * t, "steps_per_s": 1 / t, "speed_vs_fp": fp / t}
    for name, t in medians.items()
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--runs", type=int, default=50, help="timed calls per candidate (>= 20)")
  parser.add_argument(
    "--part",
    choices=("a", "b", "new", "blocks", "all"),
    default="all",
    help="a: optimizer step; b: MLP training step; new: both for the optimizers beyond one "
    "bit (not in all); blocks: lab's step by block size (not in all)",
  )
  args = parser.parse_args()
  if args.runs < 20:
    parser.error("--runs must be at least 20")

  load_before = os.getloadavg()
  out = {
    "machine": {
      "cpu": cpu_name(),
      "cores": os.cpu_count(),
      "devices": [str(d) for d in jax.devices()],
      "jax": jax.__version__,
      "optax": optax.__version__,
    },
    "runs": args.runs,
  }
  print(f"{out['machine']['cpu']}, {os.cpu_count()} cores, JAX {jax.__version__}")
  print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

  if args.part in ("a", "new", "all"):
    new = args.part == "new"
    rows = optimizer_step(args.runs, NEW_OPTIMIZERS if new else None)
    out["optimizer_step_new" if new else "optimizer_step"] = rows
    print(f"\n(a) update + apply_updates, {LAYERS} x ({FAN_IN} x {FAN_OUT} kernel + bias) float32,")
    print(f"    jitted and donated, median of {args.runs} interleaved calls")
    print(
      f"{'optimizer':34s} {'ms':>8s} {'vs adam':>8s} {'state MB':>9s} {'vs adam':>8s} {'temp MB':>8s}"
    )
    for r in rows:
      print(
        f"{r['optimizer']:34s} {r['ms']:8.2f} {r['time_vs_adam']:7.2f}x "
        f"{r['state_bytes'] / 1e6:9.1f} {r['state_vs_adam']:7.2f}x {r['temp_bytes'] / 1e6:8.1f}"
      )

  if args.part == "blocks":
    rows = block_sweep(args.runs)
    out["block_sweep"] = rows
    print(f"\n(a) with lab's blocked update by block size, median of {args.runs} interleaved calls")
    for r in rows:
      print(f"{r['optimizer']:34s} {r['ms']:8.2f} {r['time_vs_adam']:7.2f}x")

  if args.part in ("b", "new", "all"):
    new = args.part == "new"
    rows = training_step(args.runs, new)
    out["training_step_new" if new else "training_step"] = rows
    print(
      f"\n(b) MNIST MLP 784-2048x3-10 with batch norm, batch {BATCH}: jitted, donated train step"
    )
    print(f"    median of {args.runs} interleaved steps")
    print(f"{'model':34s} {'ms':>8s} {'steps/s':>8s} {'vs FP':>7s}")
    for r in rows:
      print(f"{r['model']:34s} {r['ms']:8.2f} {r['steps_per_s']:8.1f} {r['speed_vs_fp']:6.2f}x")

  load_after = os.getloadavg()
  out["load_average"] = {"before": load_before, "after": load_after}
  print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()

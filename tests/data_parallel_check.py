"""One training step of ``lab-optax mlp`` over 8 devices (data-parallel), held against one device.

``test_cli.py`` runs this script in a child process with 8 simulated CPU
devices; by hand::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/data_parallel_check.py

For each method it builds the task of ``lab-optax mlp --hidden 32 --batch-size 64``
as the command line does, and takes one step from the same start on the same
batch with ``train.py``'s own code, once on a mesh of 8 devices and once on a
mesh of one. It prints one JSON object: per method, the relative difference of
the step's loss and, per group of state leaves, the largest difference over the
largest value.

What one step computes from the shared start is compared: the loss, batch
norm's running statistics, and Adam's moments (``0.1 g`` and ``0.001 g**2``
after one step: the gradient itself) and LAB's alpha. On any CPU these differ
by the order of the float additions only, about 1e-6. Batch norm statistics
taken per shard, or a gradient that is not the mean over all shards, are off
by O(1).

The params after the step are not compared, nor are later steps. Adam's first
step is about ``lr * sign(g)``, and where the exact gradient is zero (the
weights on an input pixel that is constant over the batch: batch norm removes
the mean) ``g`` is rounding noise whose sign follows the order of the
additions; a LAB latent weight can change sign with it. So two meshes, like
two CPUs, differ by a whole step in some weights from the first step on, and
training curves drift apart: ``test_cli.py`` compares whole runs loosely.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from lab_optax.experiments import cli, models, train

ARGS = ["mlp", "--hidden", "32", "--batch-size", "64"]
METHODS = ("fp", "lab")
GROUPS = ("batch_stats", "mu", "nu", "alpha")


def group(path: str) -> str | None:
  """Which compared group a leaf of the pure state ``(model, optimizer)`` is in."""
  if path.startswith("[0]") and path.endswith(("['mean']", "['var']")):
    return "batch_stats"
  for name in ("mu", "nu", "alpha"):
    if f"['{name}']" in path:
      return name
  return None


def one_step(task, method, devices):
  mesh = train.make_mesh(devices)
  graphdef, _, state = train.initial_state(task, method, 0, mesh)
  batch = next(task.train_batches(np.random.default_rng([0, 0])))
  sharded = train.shard_batch(batch, mesh)
  state, loss = train._train_step(graphdef, task.loss, state, sharded)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
  return {
    "loss": float(loss),
    "leaves": {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in leaves},
    "rows_per_device": sorted(s.data.shape[0] for s in sharded[0].addressable_shards),
    "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)),
  }


def compare(task, method):
  many, one = one_step(task, method, 8), one_step(task, method, 1)
  errors, counts = dict.fromkeys(GROUPS, 0.0), dict.fromkeys(GROUPS, 0)
  for path, ref in one["leaves"].items():
    name = group(path)
    if name is None or ref.size == 0:
      continue
    diff = np.max(np.abs(many["leaves"][path] - ref)) / max(np.max(np.abs(ref)), 1e-30)
    errors[name], counts[name] = max(errors[name], float(diff)), counts[name] + 1
  return {
    "loss": abs(many["loss"] - one["loss"]) / abs(one["loss"]),
    "errors": errors,
    "leaves": counts,
    "rows_per_device": many["rows_per_device"],
    "replicated": many["replicated"],
  }


def main():
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.devices()}"
  task_for, _ = cli._experiment(cli.build_parser().parse_args(ARGS))
  results = {}
  for name in METHODS:
    method = models.METHODS[name]
    results[name] = compare(task_for(method), method)
  print(json.dumps({"devices": jax.device_count(), "methods": results}))


if __name__ == "__main__":
  main()

"""Where the time of LATe's step goes on XLA:CPU, and the floor of an exact solver.

Run from the repository root::

  python benchmarks/lat_exact_floor.py [--runs 10] [--json floor.json]

On the 10M-parameter tree of ``bench_optimizer.py`` (5 kernels of 1000 x 2000
with biases), beside ``optax.adam``'s step in the same process, it times each
piece that an exact ternary solver needs, jitted, per leaf of the tree:

* ``lat(solver="exact")``: the whole step, as the library runs it;
* ``sort |w|``: ``jnp.sort`` of the magnitudes (the exact optimum is a top-k set
  by ``|w|``, and ``k`` is found from prefix sums in that order);
* ``sort |w| with d``: ``lax.sort`` of the magnitudes carrying ``d`` along, which
  the prefix sums of ``d |w|`` and ``d`` need;
* ``cumsum``: the two prefix sums and the argmax over ``k`` on sorted data;
* ``histogram``: ``d`` and ``d |w|`` added into 4096 bins of ``|w|`` (a
  scatter-add), the first pass of a sort-free exact solver that would bound the
  objective per bin and sort only the bins that can hold the optimum;
* ``one pass``: a read of ``w`` and ``d`` with one reduction (the cost of one
  more pass over the weights, LATa's round).

Each figure is the median of ``--runs`` interleaved calls, with its ratio to
Adam's step.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from bench_optimizer import _step_call, _tree_and_grads, interleaved_medians
from machine import cpu_name

import lab_optax

BINS = 4096


def per_kernel(fn):
  """``fn`` over every kernel of the tree, jitted; returns a blocking call."""
  f = jax.jit(lambda ws, ds: [fn(w, d) for w, d in zip(ws, ds)])

  def make(ws, ds):
    jax.block_until_ready(f(ws, ds))
    return lambda: jax.block_until_ready(f(ws, ds))

  return make


def sort_abs(w, d):
  return jnp.sort(jnp.abs(w).ravel())


def sort_with_d(w, d):
  return jax.lax.sort((jnp.abs(w).ravel(), d.ravel()), num_keys=1)


def cumsum_argmax(w, d):
  a, dd = jnp.abs(w).ravel(), d.ravel()
  s1, s0 = jnp.cumsum(dd * a), jnp.cumsum(dd)
  return jnp.argmax(s1 * s1 / s0)


def histogram(w, d):
  a, dd = jnp.abs(w).ravel(), d.ravel()
  top = jnp.max(a)
  idx = jnp.clip((a / top * BINS).astype(jnp.int32), 0, BINS - 1)
  return jnp.zeros(BINS).at[idx].add(dd), jnp.zeros(BINS).at[idx].add(dd * a)


def one_pass(w, d):
  return jnp.sum(d * jnp.abs(w))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  params, grads = _tree_and_grads()
  calls = {
    "optax.adam": _step_call(optax.adam(1e-3), params, grads)[0],
    "lat(solver='exact')": _step_call(lab_optax.lat(1e-3, solver="exact"), params, grads)[0],
  }
  kernels = [p for p in jax.tree.leaves(params) if p.ndim == 2]
  ds = [jnp.sqrt(g * g) + 1e-8 for g in jax.tree.leaves(grads) if g.ndim == 2]
  pieces = {
    "sort |w|": sort_abs,
    "sort |w| with d": sort_with_d,
    "cumsum and argmax": cumsum_argmax,
    f"histogram ({BINS} bins, scatter-add)": histogram,
    "one pass (a reduction)": one_pass,
  }
  for name, fn in pieces.items():
    calls[name] = per_kernel(fn)(kernels, ds)
  medians = interleaved_medians(calls, args.runs)
  adam = medians["optax.adam"]
  rows = [{"piece": k, "ms": 1e3 * t, "vs_adam": t / adam} for k, t in medians.items()]
  print(f"{cpu_name()}, {jax.devices()[0].platform}, {sum(k.size for k in kernels)} kernel weights")
  for r in rows:
    print(f"{r['piece']:40s} {r['ms']:10.2f} ms  {r['vs_adam']:8.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

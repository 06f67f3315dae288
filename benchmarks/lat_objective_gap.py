"""LATa's objective against LATe's over a training run.

Run from the repository root::

  python benchmarks/lat_objective_gap.py [--steps 300] [--rounds 0 1 10] [--json gaps.json]

Trains the digits MLP (64-256-256-10, tanh, squared hinge loss, full batch of
the 1077 training images, Adam learning rate 1e-2, clip 1) with
``lab_optax.lat(solver="approximate")`` for ``--steps`` steps, once per number of
scales (1, 2) and per number of rounds per step (``TernaryProjection(solver=
"approximate", rounds=r)`` in :func:`lab_optax.projected_adam`; 0 is the
default of :func:`lab_optax.lat`, 10 the authors'). After every step, for each quantized kernel,
with the step's curvature ``d = sqrt(nu / (1 - b2^t)) + eps`` (from the state)
and the latent weights ``w``, it computes the objective ``sum d (q - w)^2`` of

* ``q`` = the params the optimizer wrote (LATa's projection, the scale rounded so
  that the params land exactly on the level set, and at most doubled per step);
* ``q`` = the exact projection, :func:`lab_optax.proximal_ternarize` with
  ``solver="exact"`` (the same number of scales),

and reports the relative gap ``(approx - exact) / exact`` over all kernels and
steps: its maximum, its mean, and the step of the maximum. The columns
"solver" give the same for LATa's solver alone
(:func:`lab_optax._src.quantizers.ternary_approximate` from the previous step's
codes, without the scale's rounding), which separates the solver from the
rounding and the per-step cap on the scale's growth.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lab_optax
from lab_optax._src import quantizers
from lab_optax.experiments.data import load_digits


def mlp_params(sizes, seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"kernel{i}"] = jnp.asarray(
      rng.uniform(-1, 1, (n_in, n_out)) / np.sqrt(n_in), jnp.float32
    )
    params[f"bias{i}"] = jnp.zeros((n_out,), jnp.float32)
  return params


def mlp_apply(params, x):
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f"kernel{i}"] + params[f"bias{i}"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def squared_hinge(logits, labels):
  target = 2.0 * jax.nn.one_hot(labels, logits.shape[-1]) - 1.0
  return jnp.mean(jnp.sum(jnp.maximum(0.0, 1.0 - target * logits) ** 2, axis=-1))


def objective(q, w, d):
  return jnp.sum(d * (q - w) ** 2)


def gap_run(x, y, *, scales, rounds, steps, lr=1e-2, sizes=(64, 256, 256, 10), seed=0,
            b2=0.999, eps=1e-8):  # fmt: skip
  """Per step and kernel: (optimizer's objective, LATa solver's objective, exact objective)."""
  projection = lab_optax.projections.TernaryProjection("approximate", scales, rounds=rounds)
  tx = lab_optax.projected_adam(lr, b2=b2, eps=eps, projection=projection)
  params = mlp_params(sizes, seed)
  kernels = [k for k in params if k.startswith("kernel")]

  def loss(p):
    return squared_hinge(mlp_apply(p, x), y)

  @jax.jit
  def run(params):
    state = tx.init(params)
    params = lab_optax.quantize_params(params, state)

    def step(carry, _):
      params, state = carry
      updates, new_state = tx.update(jax.grad(loss)(params), state, params)
      new_params = optax.apply_updates(params, updates)
      t = new_state.count.astype(jnp.float32)
      out = []
      for k in kernels:
        w = new_state.latent[k]
        d = jnp.sqrt(new_state.nu[k] / (1 - b2**t)) + eps
        exact = lab_optax.proximal_ternarize(w, d, solver="exact", scales=scales)
        prev_codes = projection.codes(params[k], state.alpha[k])
        codes, scale = quantizers.ternary_approximate(w, d, None, prev_codes, rounds, scales=scales)
        solver = quantizers.dequantize(codes, scale)
        out.append(
          jnp.stack(
            [objective(new_params[k], w, d), objective(solver, w, d), objective(exact, w, d)]
          )
        )
      return (new_params, new_state), (jnp.stack(out), loss(new_params))

    _, (objs, losses) = jax.lax.scan(step, (params, state), length=steps)
    return objs, losses

  objs, losses = run(params)
  return np.asarray(objs, np.float64), np.asarray(losses)


def summarize(objs):
  """Max and mean relative gaps to the exact objective, over steps and kernels."""
  exact = objs[..., 2]
  out = {}
  for name, col in (("optimizer", 0), ("solver", 1)):
    gap = (objs[..., col] - exact) / exact
    worst = np.unravel_index(np.argmax(gap), gap.shape)
    out[name] = {
      "max": float(gap.max()),
      "mean": float(gap.mean()),
      "argmax_step": int(worst[0]) + 1,
      "min": float(gap.min()),
    }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, nargs="+", default=[0, 1, 10])
  parser.add_argument("--scales", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--json", type=str, default=None)
  args = parser.parse_args()
  data = load_digits()
  x = jnp.asarray(data.train.images.reshape(len(data.train.images), -1))
  y = jnp.asarray(data.train.labels)
  rows = []
  print(
    f"digits MLP 64-256-256-10, full batch, lr {args.lr}, {args.steps} steps; jax {jax.__version__}"
  )
  header = (
    f"{'scales':>6} {'rounds':>6} | {'optimizer max':>13} {'mean':>9} {'at step':>7} | "
    f"{'solver max':>10} {'mean':>9} {'at step':>7} | {'loss first':>10} {'last':>8} {'s':>5}"
  )
  print(header)
  print("-" * len(header))
  for scales in args.scales:
    for rounds in args.rounds:
      t0 = time.time()
      objs, losses = gap_run(x, y, scales=scales, rounds=rounds, steps=args.steps, lr=args.lr)
      s = summarize(objs)
      o, v = s["optimizer"], s["solver"]
      print(
        f"{scales:>6} {rounds:>6} | {o['max']:>13.3e} {o['mean']:>9.2e} {o['argmax_step']:>7} | "
        f"{v['max']:>10.3e} {v['mean']:>9.2e} {v['argmax_step']:>7} | "
        f"{losses[0]:>10.4f} {losses[-1]:>8.4f} {time.time() - t0:>5.1f}",
        flush=True,
      )
      rows.append(
        {"scales": scales, "rounds": rounds, **s, "loss": [float(losses[0]), float(losses[-1])]}
      )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"steps": args.steps, "lr": args.lr, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()

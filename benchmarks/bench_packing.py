"""Model size of packed binarized weights, and XNOR-popcount against the float product.

Run from the repository root::

  python benchmarks/bench_packing.py [--json results.json] [--runs 50]

Part 1 builds the paper's MNIST MLP 784-2048-2048-2048-10 with batch norm after
every layer, exactly as ``lab-optax mlp --dataset mnist`` trains it
(``lab_optax.experiments.models.MLP``: binarized kernels without biases, since
the batch norm that follows has one; batch-norm scale, bias, running mean and
variance), trains it with ``lab_optax.lab`` for a few steps on random data (only
so that the params are real binarized weights), and compares the float32
``.npz`` of the whole model state with two ``lab_optax.save_packed`` files:
the model after ``lab_optax.nnx.pack_model``, which loads back bit for bit, and
the model after ``MLP.fold_batch_norm`` (``lab_optax.nnx.fold_batch_norm`` on
every layer) and ``pack_model``, whose outputs match the float model's up to
float rounding (checked on 1000 random inputs).

Part 2 times ``lab_optax.xnor_matmul`` against a float32 ``jnp.dot`` at the
paper's layer shape, batch 100 and a 2048 x 2048 layer: both jitted, run
alternately in the same process, medians of ``--runs`` calls each (with
``block_until_ready``). It also times the other formulations that were tried,
and the full layer helpers ``xnor_dense`` (packing the activations too) and
``binary_dense``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from machine import cpu_name

import lab_optax
from lab_optax.experiments.models import METHODS, MLP, squared_hinge

SIZES = (784, 2048, 2048, 2048, 10)


# ---------------------------------------------------------------------------
# Part 1: file size.


def trained_mlp(steps: int, method=METHODS["lab"]) -> nnx.Module:
  """The experiments' MNIST MLP (lab_optax.experiments.models.MLP) after a few steps of ``method``."""
  model = MLP(
    SIZES[0], SIZES[-1], hidden=SIZES[1], depth=len(SIZES) - 2, method=method, rngs=nnx.Rngs(0)
  )
  optimizer = nnx.Optimizer(model, method.make_optimizer(1e-2, model), wrt=nnx.Param)
  lab_optax.nnx.binarize_model(model, optimizer)

  @nnx.jit
  def step(model, optimizer, key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (100, SIZES[0]))
    y = jax.random.randint(ky, (100,), 0, SIZES[-1])
    grads = nnx.grad(lambda m: squared_hinge(m(x), y))(model)
    optimizer.update(model, grads)

  for i in range(steps):
    step(model, optimizer, jax.random.key(i + 1))
  model.eval()
  return model


def _flat(state) -> dict:
  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)
  }


def _fresh_mlp() -> MLP:
  return MLP(
    SIZES[0],
    SIZES[-1],
    hidden=SIZES[1],
    depth=len(SIZES) - 2,
    method=METHODS["lab"],
    rngs=nnx.Rngs(1),
  )


PACKED = (lab_optax.PackedBinary, lab_optax.PackedQuantized)


def _packed_sizes(packed_state) -> dict:
  leaves = jax.tree.leaves(packed_state, is_leaf=lambda x: isinstance(x, PACKED))
  packed = [x for x in leaves if isinstance(x, PACKED)]
  others = [x for x in leaves if not isinstance(x, PACKED)]
  return {
    "binarized_weights": sum(x.k * x.n for x in packed),
    "full_precision_values": sum(int(np.size(x)) for x in others),
    "kernel_float32_bytes": sum(4 * x.k * x.n for x in packed),
    "kernel_bits_bytes": sum(sum(a.nbytes for a in jax.tree.leaves(x)) for x in packed),
    "full_precision_bytes": sum(np.asarray(x).nbytes for x in others),
  }


def file_sizes(model: nnx.Module) -> dict:
  """The model's state as a float32 .npz against two save_packed files.

  "exact": ``pack_model`` of the model as it is, whose file gives the float
  state back bit for bit. "folded": ``MLP.fold_batch_norm`` first (each batch
  norm folded into the binary layer before it: per-channel alpha and a bias),
  whose outputs equal the float model's up to float rounding.
  """
  float_state = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model)))  # a copy
  x = jax.random.normal(jax.random.key(123), (1000, SIZES[0]))
  expected = np.asarray(model(x))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    float_path = os.path.join(tmp, "float32.npz")
    np.savez(float_path, **_flat(float_state))
    float_bytes = os.path.getsize(float_path)
    for name in ("exact", "folded"):
      exported = nnx.clone(model)
      extra = {}
      if name == "folded":
        exported.fold_batch_norm()
        # The folded float model as float32 too: the ratio does not rest on the batch norms.
        folded_float_path = os.path.join(tmp, "folded_float32.npz")
        np.savez(folded_float_path, **_flat(nnx.as_pure(nnx.state(exported))))
        extra["folded_float32_npz_bytes"] = os.path.getsize(folded_float_path)
      lab_optax.nnx.pack_model(exported)
      packed_state = nnx.state(exported)
      path = os.path.join(tmp, f"{name}.npz")
      lab_optax.save_packed(path, packed_state)
      # The file, loaded into a fresh model, gives the exported model back.
      fresh = _fresh_mlp()
      if name == "folded":
        fresh.fold_batch_norm()
      nnx.update(fresh, lab_optax.load_packed(path))
      fresh.eval()
      out = np.asarray(fresh(x))
      np.testing.assert_array_equal(out, np.asarray(exported(x)))
      if name == "exact":  # bit for bit
        lab_optax.nnx.unpack_model(fresh)
        for a, b in zip(_flat(nnx.as_pure(nnx.state(fresh))).values(), _flat(float_state).values()):
          np.testing.assert_array_equal(
            np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)
          )
      packed_bytes = os.path.getsize(path)
      results[name] = {
        "float32_npz_bytes": float_bytes,
        "packed_file_bytes": packed_bytes,
        "ratio": float_bytes / packed_bytes,
        **extra,
        **_packed_sizes(packed_state),
        # Outputs of the loaded packed model against the float model, 1000 random inputs.
        "max_abs_output_difference": float(np.max(np.abs(out - expected))),
        "max_abs_output": float(np.max(np.abs(expected))),
        "same_argmax_fraction": float(np.mean(out.argmax(1) == expected.argmax(1))),
      }
  return results


# ---------------------------------------------------------------------------
# Part 2: speed.


def xnor_broadcast(a_bits: jax.Array, b_bits: jax.Array, k: int) -> jax.Array:
  """A formulation that was tried: broadcast to (M, N, W), reduce the minor axis."""
  counts = jax.lax.population_count(a_bits[:, None, :] ^ b_bits[None, :, :])
  return k - 2 * jnp.sum(counts, axis=-1, dtype=jnp.uint32).astype(jnp.int32)


def xnor_fori_unroll1(a_bits: jax.Array, b_bits: jax.Array, k: int) -> jax.Array:
  """The shipped loop over words without unrolling."""
  a_t, b_t = a_bits.T, b_bits.T

  def step(w, acc):
    return acc + jax.lax.population_count(a_t[w][:, None] ^ b_t[w][None, :])

  acc = jnp.zeros((a_bits.shape[0], b_bits.shape[0]), jnp.uint32)
  return k - 2 * jax.lax.fori_loop(0, a_bits.shape[1], step, acc).astype(jnp.int32)


def time_alternately(fns: dict, runs: int) -> dict:
  """Median milliseconds per call, the candidates interleaved run by run."""
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, (fn, args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def matmul_speed(m: int, k: int, n: int, runs: int) -> dict:
  rng = np.random.default_rng(0)
  a = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0).astype(np.float32)
  b = np.where(rng.random((k, n)) < 0.5, -1.0, 1.0).astype(np.float32)
  a_bits, b_bits = lab_optax.pack_bits(a), lab_optax.pack_bits(b.T)
  exact = a.astype(np.int64) @ b.astype(np.int64)
  np.testing.assert_array_equal(lab_optax.xnor_matmul(a_bits, b_bits, k), exact)
  np.testing.assert_array_equal(xnor_broadcast(a_bits, b_bits, k), exact)
  np.testing.assert_array_equal(xnor_fori_unroll1(a_bits, b_bits, k), exact)

  kernel = 0.01 * jnp.asarray(b)
  packed = lab_optax.pack({"w": kernel})["w"]
  x, a, b = jnp.asarray(a), jnp.asarray(a), jnp.asarray(b)
  fns = {
    "float32 jnp.dot": (jax.jit(jnp.dot), (x, b)),
    "xnor_matmul": (jax.jit(lab_optax.xnor_matmul, static_argnums=2), (a_bits, b_bits, k)),
    "xnor, fori without unroll": (
      jax.jit(xnor_fori_unroll1, static_argnums=2),
      (a_bits, b_bits, k),
    ),
    "xnor, broadcast + reduce": (jax.jit(xnor_broadcast, static_argnums=2), (a_bits, b_bits, k)),
    "xnor_dense (packs x too)": (jax.jit(lab_optax.xnor_dense), (x, packed)),
    "binary_dense (float)": (jax.jit(lab_optax.binary_dense), (x, packed)),
  }
  return time_alternately(fns, runs)


# ---------------------------------------------------------------------------
# Part 3: ternary and m-bit models, file size and end-to-end inference.


def low_bit_file_size(model: nnx.Module) -> dict:
  """The folded model as a float32 .npz against its save_packed file (pack_model after folding)."""
  folded = nnx.clone(model)
  folded.fold_batch_norm()
  x = jax.random.normal(jax.random.key(123), (1000, SIZES[0]))
  expected = np.asarray(folded(x))
  packed = lab_optax.nnx.pack_model(nnx.clone(folded))
  with tempfile.TemporaryDirectory() as tmp:
    float_path, path = os.path.join(tmp, "float32.npz"), os.path.join(tmp, "packed.npz")
    np.savez(float_path, **_flat(nnx.as_pure(nnx.state(folded))))
    lab_optax.save_packed(path, nnx.state(packed))
    loaded = lab_optax.load_packed(path)
    float_bytes, packed_bytes = os.path.getsize(float_path), os.path.getsize(path)
  leaves = jax.tree.leaves(loaded, is_leaf=lambda x: isinstance(x, PACKED))
  bits = sorted({x.bits_per_weight for x in leaves if isinstance(x, PACKED)})
  out = np.asarray(packed(x))
  sizes = _packed_sizes(nnx.state(packed))
  return {
    "float32_npz_bytes": float_bytes,
    "packed_file_bytes": packed_bytes,
    "ratio": float_bytes / packed_bytes,
    "kernel_ratio": sizes["kernel_float32_bytes"] / sizes["kernel_bits_bytes"],
    "bits_per_weight": bits,
    **sizes,
    "max_abs_output_difference": float(np.max(np.abs(out - expected))),
    "max_abs_output": float(np.max(np.abs(expected))),
    "same_argmax_fraction": float(np.mean(out.argmax(1) == expected.argmax(1))),
  }


def _forward(model: nnx.Module):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def inference_speed(models: dict, batch: int, runs: int) -> dict:
  """Per model: the folded float model against it packed, jitted, batch ``batch``, interleaved."""
  x = jax.random.normal(jax.random.key(7), (batch, SIZES[0]))
  fns, outputs = {}, {}
  for name, model in models.items():
    folded = nnx.clone(model)
    folded.fold_batch_norm()
    packed = lab_optax.nnx.pack_model(nnx.clone(folded))
    for kind, m in (("float", folded), ("packed", packed)):
      fn, state = _forward(m)
      fns[f"{name} {kind}"] = (fn, (state, x))
      outputs[f"{name} {kind}"] = np.asarray(fn(state, x))
  times = time_alternately(fns, runs)
  result = {}
  for name in models:
    f, p = outputs[f"{name} float"], outputs[f"{name} packed"]
    result[name] = {
      "float_ms": times[f"{name} float"],
      "packed_ms": times[f"{name} packed"],
      "speedup": times[f"{name} float"] / times[f"{name} packed"],
      "max_abs_output_difference": float(np.max(np.abs(p - f))),
      "max_abs_output": float(np.max(np.abs(f))),
      "same_argmax_fraction": float(np.mean(p.argmax(1) == f.argmax(1))),
    }
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", help="also write the results to this JSON file")
  parser.add_argument("--runs", type=int, default=50, help="timed calls per candidate (>= 20)")
  parser.add_argument("--steps", type=int, default=3, help="training steps of each MLP")
  parser.add_argument("--batch", type=int, default=100, help="batch of the end-to-end timing")
  args = parser.parse_args()
  if args.runs < 20:
    parser.error("--runs must be at least 20")

  machine = {
    "cpu": cpu_name(),
    "cores": os.cpu_count(),
    "device": str(jax.devices()[0]),
    "jax": jax.__version__,
  }
  print(
    f"machine: {machine['cpu']}, {machine['cores']} cores, JAX {machine['jax']} on {machine['device']}"
  )

  sizes = file_sizes(trained_mlp(args.steps))
  print("\nMNIST MLP 784-2048-2048-2048-10 with batch norm, trained with lab_optax.lab")
  for name, what in (
    ("exact", "pack_model: bit for bit"),
    ("folded", "fold_batch_norm, then pack_model: up to float rounding"),
  ):
    r = sizes[name]
    print(f" {what}")
    print(f"  binarized weights       {r['binarized_weights']:>12,}")
    print(f"  full-precision values   {r['full_precision_values']:>12,}")
    print(f"  float32 .npz            {r['float32_npz_bytes']:>12,} bytes")
    print(f"  save_packed file        {r['packed_file_bytes']:>12,} bytes")
    print(f"    of which bits+alphas  {r['kernel_bits_bytes']:>12,} bytes")
    print(f"    full-precision leaves {r['full_precision_bytes']:>12,} bytes")
    print(f"  ratio                   {r['ratio']:>12.2f}x")
    if "folded_float32_npz_bytes" in r:
      folded_float = r["folded_float32_npz_bytes"]
      print(f"  folded float32 .npz     {folded_float:>12,} bytes")
      print(f"  ratio to it             {folded_float / r['packed_file_bytes']:>12.2f}x")
    print(f"  kernels alone           {r['kernel_float32_bytes'] / r['kernel_bits_bytes']:>12.2f}x")
    print(
      f"  outputs vs float model  max |diff| {r['max_abs_output_difference']:.2e}"
      f" (max |output| {r['max_abs_output']:.2f}), same argmax {r['same_argmax_fraction']:.1%}"
    )

  m, k, n = 100, 2048, 2048
  speed = matmul_speed(m, k, n, args.runs)
  base = speed["float32 jnp.dot"]
  print(f"\n({m}, {k}) x ({k}, {n}), median of {args.runs} jitted calls each, interleaved")
  print(f"  {'':28} {'ms':>8} {'speed-up vs dot':>16}")
  for name, ms in speed.items():
    print(f"  {name:28} {ms:8.3f} {base / ms:15.2f}x")

  ternary_binary_inputs = dataclasses.replace(
    METHODS["lat"], name="lat-binary-inputs", binary_activations=True
  )
  models = {
    name: trained_mlp(args.steps, method)
    for name, method in (
      ("lab2", METHODS["lab2"]),
      ("lat", METHODS["lat"]),
      ("lat, binary inputs", ternary_binary_inputs),
      ("laq3", METHODS["laq3"]),
    )
  }
  low_bit = {name: low_bit_file_size(models[name]) for name in ("lat", "laq3")}
  print("\nFolded MNIST MLP, ternary (lab_optax.lat) and 3-bit (lab_optax.laq): save_packed file")
  for name, r in low_bit.items():
    print(
      f"  {name:5} bits {r['bits_per_weight']}: float32 {r['float32_npz_bytes']:,} bytes, packed"
      f" {r['packed_file_bytes']:,} bytes, ratio {r['ratio']:.2f}x (kernels alone"
      f" {r['kernel_ratio']:.2f}x); outputs max |diff| {r['max_abs_output_difference']:.1e}"
      f" (max |output| {r['max_abs_output']:.2f}), same argmax {r['same_argmax_fraction']:.1%}"
    )
  inference = inference_speed(models, args.batch, args.runs)
  print(
    f"\nEnd to end: folded MNIST MLP, float model vs packed, batch {args.batch}, median of"
    f" {args.runs} jitted calls each, interleaved"
  )
  print(f"  {'':22} {'float ms':>9} {'packed ms':>10} {'speed-up':>9}  max |diff| / max |out|")
  for name, r in inference.items():
    print(
      f"  {name:22} {r['float_ms']:9.3f} {r['packed_ms']:10.3f} {r['speedup']:8.2f}x"
      f"  {r['max_abs_output_difference']:.1e} / {r['max_abs_output']:.2f}"
      f" (same argmax {r['same_argmax_fraction']:.0%})"
    )

  if args.json:
    with open(args.json, "w") as f:
      results = {
        "machine": machine,
        "file_size": sizes,
        "matmul_ms": speed,
        "low_bit_file_size": low_bit,
        "inference": inference,
        "runs": args.runs,
        "batch": args.batch,
      }
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()

"""Where one optimizer step of part (a) spends its time, thread by thread, on XLA:CPU.

Run from the repository root::

  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/profile_optimizer.py [--optimizer lab]

It traces a few jitted, donated steps of ``bench_optimizer.py``'s part (a) with
``jax.profiler`` and prints, for the last step, every piece of the compiled
program that took more than ``--min-us`` microseconds: when it started, how
long it took and on which thread. XLA:CPU names the pieces after the fused
loops and while loops of the compiled HLO
(``jax.jit(step).lower(...).compile().as_text()`` shows them). Without the
``XLA_FLAGS`` above only the whole step is traced. Timings under the profiler
are longer than without it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
from pathlib import Path

import jax
from bench_optimizer import NEW_OPTIMIZERS, OPTIMIZERS, _step_call, _tree_and_grads


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizer", default="lab", choices=sorted(OPTIMIZERS | NEW_OPTIMIZERS))
  parser.add_argument("--min-us", type=float, default=40.0, help="shortest piece shown")
  args = parser.parse_args()
  if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    print("note: XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true shows the pieces of the step")
  call = _step_call((OPTIMIZERS | NEW_OPTIMIZERS)[args.optimizer](), *_tree_and_grads())[0]
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(4):
        call()
    # The perfetto trace (the other .json.gz is TensorBoard's).
    (trace_file,) = Path(trace_dir).glob("**/perfetto_trace.json.gz")
    trace = json.load(gzip.open(trace_file))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  spans = sorted(
    (e for e in events if e.get("ph") == "X" and not e["name"].startswith(("$", "Threadpool"))),
    key=lambda e: e["ts"],
  )
  steps = [e for e in spans if e["name"].startswith("PjitFunction")]
  start = steps[-1]["ts"]
  last = [e for e in spans if e["ts"] >= start]
  threads = {tid: f"thread {i}" for i, tid in enumerate(dict.fromkeys(e["tid"] for e in last))}
  end = max(e["ts"] + e["dur"] for e in last)
  print(f"{args.optimizer}: last of 4 traced steps, {end - start:.0f} us from call to end")
  print(f"{'start us':>9} {'took us':>8}  thread    piece")
  for e in last:
    if e["dur"] >= args.min_us and not e["name"].startswith(("ThunkExecutor", "end:")):
      print(f"{e['ts'] - start:9.0f} {e['dur']:8.0f}  {threads[e['tid']]:9} {e['name']}")


if __name__ == "__main__":
  main()

"""lab, bwn and binary_connect sharded over a device mesh give the one-device results.

The runs happen in a child process (``sharding_check.py``) with 8 simulated CPU
devices, since the device count is fixed once JAX starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("sharding_check.py")
METHODS = ("lab", "bwn", "binary_connect")
LAYOUTS = ("fully_sharded", "per_channel", "data_parallel")
# By default: every layout with lab on automatic axes, each other method once (the
# methods differ only in their scale's sums, the layouts in the collectives), and
# explicit axes once; every method in every layout on both kinds of axes with -m slow.
ALL = [f"{axes}/{layout}/{method}" for axes in ("auto", "explicit") for layout in LAYOUTS
       for method in METHODS]  # fmt: skip
FAST = [f"auto/{layout}/lab" for layout in LAYOUTS] + [
  "auto/per_channel/bwn",
  "auto/data_parallel/binary_connect",
  "explicit/fully_sharded/lab",
]
SLOW = [case for case in ALL if case not in FAST]
# Sharded reductions (alpha, matmuls, the batch mean) add in another order than
# on one device; a per-shard alpha or a missing all-reduce is off by O(1). The
# ten steps feed that back through the gradient: the largest difference,
# BinaryConnect's first moment with per-channel shards, is 7e-6 after one step and
# 9.7e-5 after three (with XLA's default and AVX code alike), the others below 1e-5.
TOLERANCE = 1e-3


def run_check(cases):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  proc = subprocess.run(
    [sys.executable, str(CHECK), *cases],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert sorted(out["cases"]) == sorted(cases)
  return out["cases"]


def check_case(result, name):
  _, layout, method = name.split("/")
  assert result["count"] > 1 and result["moved"], "the run must train the binarized kernels"
  assert result["binarized"] == ["k1", "k2"]
  for field, error in result["errors"].items():
    assert error < TOLERANCE, f"{field} differs from the one-device run by {error:.2e}"
  # mu, nu and latent are laid out like their params after init and every step.
  assert result["sharding_mismatches"] == []
  # One alpha over the whole tensor (or channel): each binarized kernel holds
  # one |value| per alpha although its shards differ in magnitude, so that an
  # alpha computed per shard would be far off.
  assert result["two_values"]
  if layout != "data_parallel" and method != "binary_connect":
    assert result["per_shard_alpha_spread"] > 0.5


def check_cases(cases):
  """Runs ``cases`` in one child process (one test, so that pytest-xdist cannot
  split them over two workers and two processes); names each failing case."""
  results = run_check(cases)
  failures = []
  for name in cases:
    try:
      check_case(results[name], name)
    except AssertionError as e:
      failures.append(f"{name}: {e}")
  assert not failures, "\n".join(failures)


def test_sharded_runs_match_one_device():
  check_cases(FAST)


@pytest.mark.slow
def test_sharded_runs_match_one_device_every_case():
  check_cases(SLOW)

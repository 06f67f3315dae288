"""The lab-optax command line end to end, on tiny data that the tests write."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_data import write_cifar, write_mnist, write_svhn

from lab_optax.experiments import cli

FAST = ["--no-progress", "--epochs", "2"]


def run_cli(args, capsys):
  status = cli.main(args)
  out = capsys.readouterr()
  return status, out.out, out.err


def load_results(out_dir):
  return json.loads((out_dir / "results.json").read_text())


def check_results(results, metric, methods, seeds, epochs):
  assert set(results) == {"config", "results"}
  records = results["results"]
  assert [(r["method"], r["seed"]) for r in records] == [
    (m, s) for m in methods for s in range(seeds)
  ]
  for r in records:
    assert isinstance(r[metric], float) and np.isfinite(r[metric])
    assert len(r["val_curve"]) == len(r["test_curve"]) == len(r["train_loss_curve"]) == epochs
    assert 1 <= r["best_epoch"] <= epochs
    assert r[metric] == r["test_curve"][r["best_epoch"] - 1]
    assert min(r["val_curve"]) == r["val_curve"][r["best_epoch"] - 1]
  assert results["config"]["epochs"] == epochs


def test_mlp_on_digits_with_all_seven_methods(tmp_path, capsys):
  out = tmp_path / "mlp"
  status, stdout, _ = run_cli(
    ["mlp", "--hidden", "16", "--seeds", "2", "--out", str(out), *FAST], capsys
  )
  assert status == 0
  methods = list(cli.METHOD_NAMES)
  results = load_results(out)
  check_results(results, "test_error", methods, 2, 2)
  assert all(0 <= r["test_error"] <= 100 for r in results["results"])
  assert (out / "validation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for label in ("FP", "BinaryConnect", "BWN", "LAB", "BNN", "XNOR", "LAB2"):
    assert label in stdout
  assert "+-" in stdout


def test_mlp_on_mnist_idx_files(tmp_path, capsys):
  write_mnist(tmp_path / "mnist", n_train=48, n_test=8, gz=True)
  out = tmp_path / "out"
  args = ["mlp", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--hidden", "8"]
  status, stdout, _ = run_cli(
    [*args, "--batch-size", "8", "--methods", "lab,fp", "--out", str(out), *FAST], capsys
  )
  assert status == 0
  results = load_results(out)
  check_results(results, "test_error", ["lab", "fp"], 1, 2)
  assert results["config"]["dataset"] == "mnist" and results["config"]["hidden"] == 8
  assert "paper" in stdout and "1.170" in stdout  # Table 1's LAB figure beside ours


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_cnn_on_cifar_pickles_and_svhn_mat_files(tmp_path, capsys, dataset):
  data_dir = tmp_path / dataset
  if dataset == "cifar10":
    write_cifar(data_dir, n=10)
  else:
    write_svhn(data_dir, n_train=40, n_test=6)
  out = tmp_path / "out"
  args = ["cnn", "--dataset", dataset, "--data-dir", str(data_dir), "--width", "2", "--fc", "8"]
  status, _, _ = run_cli(
    [*args, "--batch-size", "4", "--methods", "lab2,bwn", "--out", str(out), *FAST], capsys
  )
  assert status == 0
  results = load_results(out)
  check_results(results, "test_error", ["lab2", "bwn"], 1, 2)
  assert results["config"]["width"] == 2


def test_cnn_on_digits(tmp_path, capsys):
  out = tmp_path / "out"
  status, _, _ = run_cli(
    ["cnn", "--width", "2", "--fc", "8", "--methods", "lab,bnn", "--out", str(out), *FAST], capsys
  )
  assert status == 0
  check_results(load_results(out), "test_error", ["lab", "bnn"], 1, 2)


def write_text(path, n=4000, seed=0):
  rng = np.random.default_rng(seed)
  words = ["static", "int", "struct", "return", "{", "}", ";", "\n", "#define", "u32"]
  path.write_text(" ".join(rng.choice(words, size=n)))


def test_lstm_on_a_text_file_and_a_directory(tmp_path, capsys):
  (tmp_path / "src" / "sub").mkdir(parents=True)
  write_text(tmp_path / "src" / "a.h")
  write_text(tmp_path / "src" / "sub" / "b.h", seed=1)
  for text in (tmp_path / "src" / "a.h", tmp_path / "src"):
    out = tmp_path / "out"
    args = ["lstm", "--text", str(text), "--hidden", "8", "--timesteps", "10", "--batch-size", "4"]
    status, stdout, _ = run_cli(
      [*args, "--methods", "fp,bc,lab2", "--out", str(out), *FAST], capsys
    )
    assert status == 0
    results = load_results(out)
    check_results(results, "test_cross_entropy", ["fp", "bc", "lab2"], 1, 2)
    vocab = results["config"]["vocab_size"]
    # Cross-entropy in nats per character: positive and near a uniform guess after 2 tiny epochs.
    assert all(0 < r["test_cross_entropy"] < 2 * np.log(vocab) for r in results["results"])
    assert "nats/char" in stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["mlp", "--methods", "lab,foo"], "unknown method 'foo'"),
    (["mlp", "--dataset", "mnist"], "--dataset mnist needs --data-dir"),
    (["mlp", "--dataset", "mnist", "--data-dir", "{tmp}/nowhere"], "nowhere"),
    (["cnn", "--dataset", "cifar10", "--data-dir", "{tmp}"], "data_batch_1"),
    (["lstm", "--text", "{tmp}/missing.txt"], "missing.txt"),
    (["lstm", "--text", "{tmp}/short.txt"], "--batch-size 50 x --timesteps 100"),
    (["mlp", "--resume"], "--resume needs --checkpoint-dir"),
    (["mlp", "--devices", "64"], "--devices 64"),
    (["mlp", "--epochs", "0"], "positive integer"),
    (["mlp", "--hidden", "x"], "invalid"),
    (["nonsense"], "invalid choice"),
  ],
)
def test_bad_input_exits_with_status_2_and_one_line(tmp_path, capsys, args, message):
  (tmp_path / "short.txt").write_text("int x;\n" * 20)
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  status, _, err = run_cli([*args, "--no-progress"] if args[0] != "nonsense" else args, capsys)
  assert status == 2
  assert err.startswith("lab-optax: error: ") and err.count("\n") == 1
  assert message in err
  assert "Traceback" not in err


def test_corrupted_mnist_file_is_refused(tmp_path, capsys):
  write_mnist(tmp_path, n_train=12, n_test=4)
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
  status, _, err = run_cli(["mlp", "--dataset", "mnist", "--data-dir", str(tmp_path)], capsys)
  assert status == 2 and "train-images-idx3-ubyte" in err and err.count("\n") == 1


def test_console_script_reports_errors_without_traceback(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "lab_optax.experiments.cli", "mlp", "--methods", "nope"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.startswith("lab-optax: error: ") and proc.stderr.count("\n") == 1
  assert "unknown method 'nope'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_checkpoints_resume_a_finished_run_and_refuse_other_settings(tmp_path, capsys):
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  base = ["mlp", "--hidden", "8", "--methods", "lab", "--out", str(out), "--no-progress"]
  assert run_cli([*base, "--epochs", "2", "--checkpoint-dir", str(ckpt)], capsys)[0] == 0
  first = load_results(out)["results"][0]
  assert (ckpt / "lab-seed0").is_dir() and (ckpt / "config.json").is_file()
  # Resuming a finished run restores it without training more.
  assert (
    run_cli([*base, "--epochs", "2", "--checkpoint-dir", str(ckpt), "--resume"], capsys)[0] == 0
  )
  assert load_results(out)["results"][0]["val_curve"] == first["val_curve"]
  # Other settings, or no --resume on a used directory, are refused.
  status, _, err = run_cli(
    [*base, "--epochs", "3", "--checkpoint-dir", str(ckpt), "--resume"], capsys
  )
  assert status == 2 and "epochs" in err
  status, _, err = run_cli([*base, "--epochs", "2", "--checkpoint-dir", str(ckpt)], capsys)
  assert status == 2 and "--resume" in err


def test_killed_run_resumes_to_the_same_result(tmp_path):
  """Kill a training run after its first checkpoint, resume it, and get the uninterrupted result."""
  text = tmp_path / "corpus.txt"
  write_text(text, n=20000)
  common = ["lstm", "--text", str(text), "--hidden", "16", "--timesteps", "20", "--batch-size", "8"]
  common += ["--methods", "lab", "--epochs", "6", "--no-progress"]
  cmd = [sys.executable, "-m", "lab_optax.experiments.cli", *common]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}

  full = tmp_path / "full"
  subprocess.run([*cmd, "--out", str(full)], check=True, timeout=300, env=env, capture_output=True)

  ckpt, resumed = tmp_path / "ckpt", tmp_path / "resumed"
  proc = subprocess.Popen(
    [*cmd, "--out", str(resumed), "--checkpoint-dir", str(ckpt)],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  run_dir = ckpt / "lab-seed0"
  deadline = time.monotonic() + 300
  while not (run_dir.is_dir() and any(p.name.isdigit() for p in run_dir.iterdir())):
    assert proc.poll() is None, "the run ended before its first checkpoint"
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (resumed / "results.json").exists()
  saved = sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 6, "the kill must interrupt the run"
  subprocess.run(
    [*cmd, "--out", str(resumed), "--checkpoint-dir", str(ckpt), "--resume"],
    check=True,
    timeout=300,
    env=env,
    capture_output=True,
  )
  a = load_results(full)["results"][0]
  b = load_results(resumed)["results"][0]
  for key in ("val_curve", "test_curve", "train_loss_curve", "test_cross_entropy", "best_epoch"):
    assert a[key] == b[key], key


def test_data_parallel_over_eight_devices_matches_one_device(tmp_path):
  """--devices N shards each batch over N (simulated) devices; results match one device."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  base = [sys.executable, "-m", "lab_optax.experiments.cli", "mlp", "--hidden", "32"]
  base += ["--methods", "lab,fp", "--epochs", "2", "--batch-size", "64", "--no-progress"]
  curves = {}
  for devices in (1, 8):
    out = tmp_path / f"d{devices}"
    subprocess.run(
      [*base, "--devices", str(devices), "--out", str(out)],
      check=True,
      env=env,
      timeout=300,
      capture_output=True,
    )
    results = load_results(out)
    assert results["config"]["devices"] == devices
    curves[devices] = [r["train_loss_curve"] for r in results["results"]]
  # Full precision matches closely (batch norm statistics are global, not per shard); with
  # binarized weights a reordered float sum can flip a near-zero sign, so LAB drifts a little.
  np.testing.assert_allclose(curves[8][1], curves[1][1], rtol=1e-3)
  np.testing.assert_allclose(curves[8][0], curves[1][0], rtol=3e-2)
  status = subprocess.run(
    [*base, "--devices", "8", "--batch-size", "60"], env=env, capture_output=True, text=True
  )
  assert status.returncode == 2 and "divisible by the 8 devices" in status.stderr

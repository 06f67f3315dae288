"""The lab-optax command line end to end, on tiny data that the tests write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data import write_cifar, write_mnist, write_svhn

from lab_optax._src.files import write_atomic
from lab_optax.experiments import cli, models, report, settings
from lab_optax.experiments.data import DEFAULT_TEXT_PATH

FAST = ["--no-progress", "--epochs", "2"]
DATA_PARALLEL_CHECK = Path(__file__).with_name("data_parallel_check.py")


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


# The default (the paper's seven methods) with -m slow; by default one binary-weight
# and one binary-activation method (the CNN and LSTM runs below take four others).
@pytest.mark.parametrize(
  "methods",
  [
    ["xnor", "lab"],
    pytest.param(list(models.PAPER_METHODS), marks=pytest.mark.slow, id="all_seven"),
  ],
  ids=lambda m: ",".join(m),
)
def test_mlp_on_digits_with_all_seven_methods(tmp_path, capsys, methods):
  out = tmp_path / "mlp"
  args = ["mlp", "--hidden", "16", "--seeds", "2", "--out", str(out), *FAST]
  if methods != list(models.PAPER_METHODS):
    args += ["--methods", ",".join(methods)]
  status, stdout, _ = run_cli(args, capsys)
  assert status == 0
  results = load_results(out)
  check_results(results, "test_error", methods, 2, 2)
  assert all(0 <= r["test_error"] <= 100 for r in results["results"])
  assert (out / "validation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for method in methods:
    assert models.METHODS[method].label in stdout
  assert "+-" in stdout
  assert "paper" not in stdout  # the digits are not the paper's data set
  config = results["config"]
  assert config["lr"] == 0.01 and config["lr_lab2"] == 0.005  # the defaults, recorded
  # Output files get a plain open()'s mode, not mkstemp's 0600.
  umask = os.umask(0o022)
  os.umask(umask)
  for name in ("results.json", "validation_curves.png"):
    assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_export_writes_packed_models_whose_figures_match_the_float_ones(tmp_path, capsys):
  out, models_dir = tmp_path / "run", tmp_path / "models"
  args = ["mlp", "--hidden", "16", "--methods", "fp,lab2,lat", "--out", str(out)]
  status, stdout, _ = run_cli([*args, "--export", str(models_dir), *FAST], capsys)
  assert status == 0
  records = {r["method"]: r for r in load_results(out)["results"]}
  assert "export" not in records["fp"]  # nothing quantized: nothing to pack
  assert sorted(p.name for p in models_dir.iterdir()) == ["lab2-seed0.npz", "lat-seed0.npz"]
  for name, bits in (("lab2", 1.0), ("lat", 2.0)):
    export = records[name]["export"]
    assert export["file"] == f"{name}-seed0.npz"
    assert export["bytes"] == (models_dir / export["file"]).stat().st_size
    assert export["bits_per_weight"] == bits
    # Folded and packed (XNOR products for lab2), then loaded into a fresh model: the same
    # predictions on the test set as the float model after its last epoch.
    assert export["test_error_packed"] == export["test_error_float"]
    assert export["test_error_float"] == records[name]["test_curve"][-1]
    # 64-16-16-16-10 kernels and the batch norms' scales and biases, as trained.
    assert export["float32_bytes"] == 4 * (64 * 16 + 2 * 16 * 16 + 16 * 10 + 2 * (3 * 16 + 10))
  assert "exported" in stdout and "lat-seed0.npz" in stdout
  # The report of the run shows the exports too.
  status, merged, _ = run_cli(["report", str(out)], capsys)
  assert status == 0 and "lab2-seed0.npz" in merged


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
  # 8 hidden units are not Table 1's network (2048): no paper column beside these figures.
  assert "paper" not in stdout and "1.170" not in stdout


# SVHN's loader is tested in test_data.py; its run through the command line with -m slow.
@pytest.mark.parametrize("dataset", ["cifar10", pytest.param("svhn", marks=pytest.mark.slow)])
def test_cnn_on_cifar_pickles_and_svhn_mat_files(tmp_path, capsys, dataset):
  data_dir = tmp_path / dataset
  if dataset == "cifar10":
    write_cifar(data_dir, n=10)
  else:
    write_svhn(data_dir, n_train=40, n_test=6)
  out = tmp_path / "out"
  args = ["cnn", "--dataset", dataset, "--data-dir", str(data_dir), "--width", "2", "--fc", "8"]
  status, stdout, _ = run_cli(
    [*args, "--batch-size", "4", "--methods", "lab2", "--out", str(out), *FAST], capsys
  )
  assert status == 0
  results = load_results(out)
  check_results(results, "test_error", ["lab2"], 1, 2)
  assert results["config"]["width"] == 2
  # K = 2 and 8 dense units are not the paper's net: no Table 1 or 2 figure beside these.
  assert "paper" not in stdout and "2.531" not in stdout and "11.030" not in stdout


@pytest.mark.slow  # the CNN's run on CIFAR-10 pickles covers the subcommand by default
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


# The loader reads a file and a directory alike (test_data.py); the run through
# the command line on a single file is in the slow run.
@pytest.mark.parametrize("source", ["directory", pytest.param("file", marks=pytest.mark.slow)])
def test_lstm_on_a_text_file_and_a_directory(tmp_path, capsys, source):
  (tmp_path / "src" / "sub").mkdir(parents=True)
  write_text(tmp_path / "src" / "a.h")
  write_text(tmp_path / "src" / "sub" / "b.h", seed=1)
  text = tmp_path / "src" / "a.h" if source == "file" else tmp_path / "src"
  out = tmp_path / "out"
  args = ["lstm", "--text", str(text), "--hidden", "8", "--timesteps", "10", "--batch-size", "4"]
  status, stdout, _ = run_cli([*args, "--methods", "bc,lab2", "--out", str(out), *FAST], capsys)
  assert status == 0
  results = load_results(out)
  check_results(results, "test_cross_entropy", ["bc", "lab2"], 1, 2)
  vocab = results["config"]["vocab_size"]
  # Cross-entropy in nats per character: positive and near a uniform guess after 2 tiny epochs.
  assert all(0 < r["test_cross_entropy"] < 2 * np.log(vocab) for r in results["results"])
  assert "nats/char" in stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["mlp", "--methods", "lab,foo"], "unknown method 'foo'"),
    (["mlp", "--methods", "lat,laq1"], "unknown method 'laq1'"),
    (["lstm", "--methods", "laq9-log"], "unknown method 'laq9-log'"),
    (["cnn", "--methods", "lat3"], "unknown method 'lat3'"),
    (["mlp", "--dataset", "mnist"], "--dataset mnist needs --data-dir"),
    (["mlp", "--dataset", "mnist", "--data-dir", "{tmp}/nowhere"], "nowhere"),
    (["cnn", "--dataset", "cifar10", "--data-dir", "{tmp}"], "data_batch_1"),
    (["lstm", "--text", "{tmp}/missing.txt"], "missing.txt"),
    (["lstm", "--text", "{tmp}/short.txt"], "--batch-size 50 x --timesteps 100"),
    (["mlp", "--resume"], "--resume needs --checkpoint-dir"),
    (["mlp", "--devices", "64"], "--devices 64"),
    # --devices is checked before any data are read.
    (["lstm", "--text", "{tmp}/missing.txt", "--devices", "64"], "--devices 64"),
    (["mlp", "--epochs", "0"], "positive integer"),
    (["mlp", "--lr", "0"], "--lr: must be a positive finite number, got 0"),
    (["cnn", "--lr", "-1"], "positive finite number"),
    (["lstm", "--lr", "nan"], "positive finite number"),
    (["mlp", "--lr", "inf"], "positive finite number"),
    (["mlp", "--lr", "fast"], "positive finite number"),
    (["mlp", "--batch-size", "2000"], "--batch-size 2000 is larger than the 1077 training"),
    (["cnn", "--batch-size", "1078"], "lower --batch-size"),
    (["lstm", "--split", "0.8,0.2"], "--split: must be three positive fractions"),
    (["lstm", "--split", "0.9,0.1,0.1"], "summing to 1"),
    (["lstm", "--split", "0,0.5,0.5"], "TRAIN,VAL,TEST"),
    (["lstm", "--split", "a,b,c"], "TRAIN,VAL,TEST"),
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
  assert "batch_size=" not in err


@pytest.mark.parametrize("experiment", ["mlp", "cnn", "lstm"])
def test_help_has_no_literal_percent_and_states_the_defaults(capsys, experiment):
  with pytest.raises(SystemExit) as excinfo:
    cli.main([experiment, "--help"])
  assert excinfo.value.code == 0
  raw = capsys.readouterr().out
  text = " ".join(raw.split())  # undo argparse's line wrapping
  assert "%%" not in text
  expected = {
    "mlp": ["30% and 50%", "minibatch size (default: 100)", "(default: 0.01, LAB2 0.005)"],
    "cnn": ["minibatch size (default: 50)", "cifar10 0.03, svhn 0.001, digits 0.01"],
    "lstm": [
      "after 5% of the epochs",
      "minibatch size (default: 50; paper: 100)",
      "(default: 0.002",
      "LSTM units (default: 128; paper: 512)",
      "unrolled steps (default and paper: 100)",
      "--split TRAIN,VAL,TEST",
      "default: 0.9,0.05,0.05",
    ],
  }[experiment]
  for phrase in expected:
    assert phrase in text, phrase
  assert "default: the paper's" not in text
  # Every method has a line of the method list; the 2 of lat2 is not the 2 of lab2.
  listed = raw.split("methods (--methods")[1].splitlines()[1:]
  lines = {line.split()[0]: line for line in listed if line.startswith("  ")}
  for name in NEW_METHODS + ("laqN", "laqN-log", *models.PAPER_METHODS):
    assert name in lines, name
  assert "two scales" in lines["lat2"] and "not lab2's" in lines["lat2"]
  assert "binary activations" in lines["lab2"]


NEW_METHODS = ("twn", "absmean", "lat", "lat-exact", "lat2", "lat2-exact", "laq3", "laq3-log")


def test_new_methods_parse_and_the_default_stays_the_papers_seven():
  parser = cli.build_parser()
  assert parser.parse_args(["mlp"]).methods == list(models.PAPER_METHODS)
  laq = [f"laq{n}{kind}" for n in range(2, 9) for kind in ("", "-log")]
  for experiment in ("mlp", "cnn", "lstm"):
    names = ",".join(NEW_METHODS + tuple(laq))
    expected = list(dict.fromkeys([*NEW_METHODS, *laq]))  # laq3 twice: once
    assert parser.parse_args([experiment, "--methods", names]).methods == expected


def test_each_method_builds_layers_that_use_its_optimizers_projection():
  """A ternary or m-bit kernel, as the optimizer keeps it, is what the layer uses."""
  from flax import nnx

  from lab_optax._src.transform import _find_states

  for name, method in models.METHODS.items():
    if method.optimizer is None:
      assert not method.binary_weights
      continue
    tx = method.optimizer(0.01)
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
    projection = _find_states(state)[0].projection
    if name in models.PAPER_METHODS:
      assert len(projection.levels) == 2, name  # binary; the layers' default until binarize_model
      continue
    assert method.kernel_quantizer == projection, name
    assert not method.binary_activations, name  # weights only, like lab
    model = nnx.eval_shape(
      lambda m=method: models.MLP(6, 3, hidden=4, depth=1, method=m, rngs=nnx.Rngs(0))
    )
    assert [layer.kernel_quantizer for layer in model.layers] == [projection] * 2, name
  assert models.METHODS["lat2-exact"].kernel_quantizer.num_scales == 2
  assert models.METHODS["laq5-log"].kernel_quantizer.bits == 5


def test_paper_figures_only_for_the_papers_data_and_architecture():
  def paper(experiment, config):
    return settings.paper_figures({"experiment": experiment, **config})

  assert paper("mlp", {"dataset": "mnist", "hidden": 2048})["lab"] == 1.170  # Table 1
  assert paper("mlp", {"dataset": "mnist", "hidden": 32}) is None
  assert paper("mlp", {"dataset": "digits", "hidden": 2048}) is None
  cnn = {"dataset": "cifar10", "width": 128, "fc": 1024}
  assert paper("cnn", cnn)["bc"] == 9.860
  assert paper("cnn", {**cnn, "width": 64}) is None
  assert paper("cnn", {**cnn, "fc": 128}) is None
  svhn = {"dataset": "svhn", "width": 64, "fc": 1024}
  assert paper("cnn", svhn)["lab2"] == 3.362  # Table 1, all seven methods
  assert paper("cnn", {**svhn, "width": 16})["lab"] == 3.050  # Table 2
  assert paper("cnn", {**svhn, "width": 128})["fp"] == 2.146
  assert paper("cnn", {**svhn, "width": 2}) is None
  assert paper("cnn", {**svhn, "width": 32, "fc": 8}) is None
  assert paper("cnn", {"dataset": "digits", "width": 16, "fc": 128}) is None
  lstm = {"text": DEFAULT_TEXT_PATH, "hidden": 512, "timesteps": 100, "split": [0.9, 0.05, 0.05]}
  assert paper("lstm", lstm)["lab"] == 1.314  # Table 3
  assert paper("lstm", {**lstm, "hidden": 128}) is None
  assert paper("lstm", {**lstm, "timesteps": 10}) is None
  assert paper("lstm", {**lstm, "split": [0.8, 0.1, 0.1]}) is None
  assert paper("lstm", {**lstm, "text": "war_and_peace.txt"}) is None
  # Table 2 has no BNN figure: "-" for it, and no column at all when no method has one.
  records = [{"method": m, "test_error": 3.0} for m in ("lab", "bnn")]
  table = report.summarize(records, "test_error", paper("cnn", {**svhn, "width": 16}))
  assert "paper" in table and "3.050" in table and table.splitlines()[-1].endswith("-")
  table = report.summarize(records[1:], "test_error", paper("cnn", {**svhn, "width": 16}))
  assert "paper" not in table


def test_ternary_and_mbit_methods_train_from_the_command_line(tmp_path, capsys):
  out = tmp_path / "low_bit"
  args = ["mlp", "--dataset", "digits", "--epochs", "1", "--methods", "lat,laq3", "--hidden", "32"]
  status, stdout, _ = run_cli([*args, "--out", str(out), "--no-progress"], capsys)
  assert status == 0
  results = load_results(out)
  check_results(results, "test_error", ["lat", "laq3"], 1, 1)
  assert all(0 <= r["test_error"] <= 100 for r in results["results"])
  assert [r["label"] for r in results["results"]] == ["LATa", "LAQ3 (linear)"]
  assert "LATa" in stdout and "LAQ3 (linear)" in stdout and "paper" not in stdout


def fake_run(directory, methods, seeds=1, **config):
  """Writes the results.json of a run of the MLP, as the command line does, without training."""
  config = {
    "experiment": "mlp", "dataset": "digits", "hidden": 32, "batch_size": 100, "lr": 0.01,
    "lr_lab2": 0.005, "epochs": 2, "methods": methods, "seeds": seeds, "devices": 1,
    "platform": "cpu", "lab_optax_version": "0.1.0", "jax_version": "0.0", "machine": "x86_64",
    **config,
  }  # fmt: skip
  metric = settings.METRICS[config["experiment"]]
  records = []
  for i, method in enumerate(methods):
    for seed in range(seeds):
      error = 10.0 + i + seed
      records.append(
        {
          "method": method, "label": models.METHODS[method].label, "seed": seed,
          metric: error, metric.replace("test", "val"): error + 1, "best_epoch": 2, "epochs": 2,
          "val_curve": [error + 2, error + 1], "test_curve": [error + 1, error],
          "train_loss_curve": [0.5, 0.4], "wall_time_s": 1.0,
        }
      )  # fmt: skip
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "results.json").write_text(json.dumps({"config": config, "results": records}))
  return directory


def test_report_merges_separate_runs_into_one_table(tmp_path, capsys):
  mnist = {"dataset": "mnist", "hidden": 2048}  # Table 1's setting: the paper's column
  a = fake_run(tmp_path / "a", ["fp", "lab"], seeds=2, **mnist)
  b = fake_run(tmp_path / "b", ["lat"], seeds=2, devices=8, platform="gpu", **mnist)
  status, stdout, err = run_cli(["report", str(a), str(b / "results.json")], capsys)
  assert status == 0 and err == ""
  rows = [line.split() for line in stdout.splitlines()]
  assert rows[0] == ["method", "seeds", "test", "error", "(%)", "paper"]
  assert rows[2:] == [
    ["FP", "2", "10.500", "+-", "0.707", "1.190"],
    ["LAB", "2", "11.500", "+-", "0.707", "1.170"],
    ["LATa", "2", "10.500", "+-", "0.707", "-"],
  ]
  # The same table as one run of the three methods prints.
  records = load_results(a)["results"] + load_results(b)["results"]
  paper = settings.paper_figures({"experiment": "mlp", **mnist})
  assert stdout.startswith(report.summarize(records, "test_error", paper))
  # --out: the merged results.json and the plot.
  out = tmp_path / "merged"
  status, stdout, _ = run_cli(["report", str(a), str(b), "--out", str(out)], capsys)
  assert status == 0 and f"results: {out / 'results.json'}" in stdout
  merged = load_results(out)
  assert [(r["method"], r["seed"]) for r in merged["results"]] == [
    (m, s) for m in ("fp", "lab", "lat") for s in (0, 1)
  ]
  config = merged["config"]
  assert config["methods"] == ["fp", "lab", "lat"] and config["seeds"] == 2
  assert config["devices"] == [1, 8] and config["platform"] == ["cpu", "gpu"]
  assert config["machine"] == "x86_64" and config["hidden"] == 2048
  assert config["merged_from"] == [str(a / "results.json"), str(b / "results.json")]
  assert (out / "validation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A merged file merges again, with runs of other methods.
  c = fake_run(tmp_path / "c", ["bwn"], **mnist)
  assert run_cli(["report", str(out), str(c), "--out", str(out)], capsys)[0] == 0
  config = load_results(out)["config"]
  assert config["methods"] == ["fp", "lab", "lat", "bwn"] and config["devices"] == [1, 8]
  assert config["merged_from"][2:] == [str(c / "results.json")]


def test_report_refuses_other_settings_twice_the_same_run_and_bad_files(tmp_path, capsys):
  a = fake_run(tmp_path / "a", ["fp"])
  fake_run(tmp_path / "hidden", ["lab"], hidden=64)
  fake_run(tmp_path / "lstm", ["lab"], experiment="lstm", text="t.txt", timesteps=10)
  fake_run(tmp_path / "again", ["lab", "fp"])
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "results.json").write_text('{"config": {"experiment": "mlp"}')
  (tmp_path / "empty").mkdir()
  bad_export = fake_run(tmp_path / "bad_export", ["lab"])
  results = load_results(bad_export)
  results["results"][0]["export"] = {"file": "lab-seed0.npz", "bytes": 10}
  (bad_export / "results.json").write_text(json.dumps(results))
  cases = {
    "hidden": "hidden/results.json is a run of other settings than",
    "lstm": "(experiment, text, timesteps)",
    "again": "again/results.json and",
    "broken": "broken/results.json is not valid JSON",
    "empty": "no results.json in",
    "nowhere": "nowhere does not exist",
    "bad_export": "record 0 has an export entry without its file, sizes and test_error_float",
  }
  out = tmp_path / "out"
  for name, message in cases.items():
    args = ["report", str(a), str(tmp_path / name), "--out", str(out)]
    status, stdout, err = run_cli(args, capsys)
    assert status == 2 and stdout == "", name
    assert err.startswith("lab-optax: error: ") and err.count("\n") == 1, name
    assert message in err, (name, err)
  assert "hidden)" in run_cli(["report", str(a), str(tmp_path / "hidden")], capsys)[2]
  assert "fp seed 0" in run_cli(["report", str(a), str(tmp_path / "again")], capsys)[2]
  assert not out.exists()  # refused before anything was written


def test_write_atomic_gives_the_mode_of_a_plain_open(tmp_path):
  old = os.umask(0o027)
  try:
    write_atomic(tmp_path / "a" / "f.json", lambda f: f.write(b"{}"))
    with open(tmp_path / "plain", "w"):
      pass
  finally:
    os.umask(old)
  assert (tmp_path / "a" / "f.json").stat().st_mode & 0o777 == 0o640
  assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o640
  assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.json"]  # no temporary left


def test_lr_is_used_recorded_and_checked_on_resume(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  base = ["mlp", "--hidden", "8", "--methods", "fp,lab2", "--epochs", "1", "--no-progress"]
  curves = {}
  for lr in (None, "0.5"):
    out = tmp_path / f"lr{lr}"
    flags = ["--lr", lr] if lr else ["--checkpoint-dir", str(ckpt)]
    assert run_cli([*base, "--out", str(out), *flags], capsys)[0] == 0
    results = load_results(out)
    curves[lr] = [r["train_loss_curve"] for r in results["results"]]
    expected = (0.5, 0.5) if lr else (0.01, 0.005)
    assert (results["config"]["lr"], results["config"]["lr_lab2"]) == expected
  assert curves[None][0] != curves["0.5"][0] and curves[None][1] != curves["0.5"][1]
  assert json.loads((ckpt / "config.json").read_text())["lr"] == 0.01
  status, _, err = run_cli(
    [*base, "--out", str(tmp_path / "r"), "--checkpoint-dir", str(ckpt), "--resume"]
    + ["--lr", "0.5"],
    capsys,
  )
  assert status == 2 and "other settings (lr, lr_lab2)" in err


def test_a_failed_run_does_not_block_the_corrected_rerun(tmp_path, capsys):
  ckpt, out = tmp_path / "ck1", tmp_path / "c0"
  base = ["mlp", "--hidden", "8", "--epochs", "1", "--methods", "lab", "--no-progress"]
  base += ["--out", str(out), "--checkpoint-dir", str(ckpt)]
  status, _, err = run_cli([*base, "--batch-size", "2000"], capsys)
  assert status == 2 and "--batch-size 2000" in err
  assert not ckpt.exists() and not out.exists()  # refused before anything was written
  # Leftovers of a run that died before its first checkpoint (another config, an empty run
  # folder, an unfinished orbax save) hold nothing to resume: a fresh run may reuse the directory.
  (ckpt / "lab-seed0").mkdir(parents=True)
  (ckpt / "lab-seed1" / "1.orbax-checkpoint-tmp-123").mkdir(parents=True)
  (ckpt / "config.json").write_text(json.dumps({"experiment": "mlp", "batch_size": 2000}))
  assert run_cli([*base, "--batch-size", "100"], capsys)[0] == 0
  assert json.loads((ckpt / "config.json").read_text())["batch_size"] == 100
  # Now lab-seed0 holds a finished step: a rerun without --resume is refused.
  status, _, err = run_cli([*base, "--batch-size", "100"], capsys)
  assert status == 2 and "already holds runs" in err


def test_a_failed_plot_keeps_the_results_and_removes_an_older_plot(tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  (out / "validation_curves.png").write_bytes(b"an older run's plot")

  def broken(*args):
    raise RuntimeError("no backend")

  monkeypatch.setattr(report, "render_curves", broken)
  status, stdout, err = run_cli(
    [
      "mlp",
      "--hidden",
      "8",
      "--methods",
      "fp",
      "--out",
      str(out),
      "--no-progress",
      "--epochs",
      "1",
    ],
    capsys,
  )
  assert status == 1
  assert err.startswith("lab-optax: error: ") and err.count("\n") == 1 and "no backend" in err
  check_results(load_results(out), "test_error", ["fp"], 1, 1)
  assert not (out / "validation_curves.png").exists()
  assert "FP" in stdout  # the table is still printed


def test_lstm_split_is_used_recorded_and_checked_on_resume(tmp_path, capsys):
  text, ckpt = tmp_path / "t.txt", tmp_path / "ckpt"
  write_text(text, n=6000)
  base = ["lstm", "--text", str(text), "--hidden", "8", "--timesteps", "10", "--batch-size", "4"]
  base += ["--methods", "fp", "--epochs", "1", "--no-progress", "--checkpoint-dir", str(ckpt)]
  out = tmp_path / "out"
  assert run_cli([*base, "--split", "0.8,0.1,0.1", "--out", str(out)], capsys)[0] == 0
  config = load_results(out)["config"]
  assert config["split"] == [0.8, 0.1, 0.1] and config["lr"] == 0.002
  status, _, err = run_cli([*base, "--resume", "--out", str(out)], capsys)
  assert status == 2 and "other settings (split)" in err


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


def test_resume_of_nothing_says_so_and_a_diverged_run_stays_stopped(tmp_path, capsys):
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  args = ["mlp", "--hidden", "8", "--methods", "fp", "--epochs", "3", "--lr", "1e30"]
  args += ["--out", str(out), "--no-progress", "--checkpoint-dir", str(ckpt), "--resume"]
  # Nothing to resume yet: the run starts afresh, and says so.
  status, _, err = run_cli(args, capsys)
  assert status == 0 and "no finished epoch" in err and "starting afresh" in err
  # A learning rate of 1e30 diverges in the first epoch and the run stops there.
  first = load_results(out)["results"][0]
  assert len(first["train_loss_curve"]) == 1 and not np.isfinite(first["train_loss_curve"][0])
  # Resuming it does not train on from NaN weights: it stays as it stopped.
  status, _, err = run_cli(args, capsys)
  assert status == 0 and "starting afresh" not in err
  assert len(load_results(out)["results"][0]["train_loss_curve"]) == 1


@pytest.mark.slow  # about a minute; test_checkpoints_resume_* covers --resume by default
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


@pytest.mark.slow  # a whole epoch; test_one_data_parallel_step_matches_one_device runs by default
def test_data_parallel_over_eight_devices_matches_one_device(tmp_path):
  """--devices N shards each batch over N (simulated) devices; the first epoch matches one device."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  base = [sys.executable, "-m", "lab_optax.experiments.cli", "mlp", "--hidden", "32"]
  base += ["--methods", "lab,fp", "--epochs", "1", "--batch-size", "64", "--no-progress"]
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
  # Another mesh, like another CPU, adds in another order, and training amplifies that from the
  # first step on (see data_parallel_check.py): over 1, 2, 4 and 8 devices, each with XLA's
  # default, AVX and SSE4.2 code, the first epoch's mean loss (16 steps) spread over 5.4e-4 of
  # its value for FP and 6.6e-3 for LAB, whose weights also flip sign; a second epoch spread FP
  # over 2e-3. Batch norm statistics per shard raise the first epoch's loss by 24% (FP) and 17%
  # (LAB), a gradient of one shard alone by 31% and 33%. The one-step check below is the tight one.
  np.testing.assert_allclose(curves[8][1], curves[1][1], rtol=1e-2)  # FP
  np.testing.assert_allclose(curves[8][0], curves[1][0], rtol=3e-2)  # LAB
  status = subprocess.run(
    [*base, "--devices", "8", "--batch-size", "60"], env=env, capture_output=True, text=True
  )
  assert status.returncode == 2 and "divisible by the 8 devices" in status.stderr


@pytest.mark.slow  # test_sharding.py runs the optimizers data-parallel by default
def test_one_data_parallel_step_matches_one_device():
  """One training step over 8 devices against one, from the same start (data_parallel_check.py)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  proc = subprocess.run(
    [sys.executable, str(DATA_PARALLEL_CHECK)], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and sorted(out["methods"]) == ["fp", "lab"]
  for name, result in out["methods"].items():
    assert result["rows_per_device"] == [8] * 8, name  # the batch of 64 is split, not copied
    assert result["replicated"], name  # params and optimizer state stay whole on every device
    assert all(result["leaves"][g] > 0 for g in ("batch_stats", "mu", "nu")), name
    assert (result["leaves"]["alpha"] > 0) == (name == "lab"), name
    # The order of the additions alone: at most 1.8e-6 (the loss 1.8e-7) with XLA's default,
    # AVX and SSE4.2 code. Batch norm statistics per shard are off by 3.6e-3 (the loss) to 2;
    # a gradient of one shard, or a sum over shards instead of the mean, by 6 to 180 (the moments).
    assert result["loss"] < 1e-4, name
    for group, error in result["errors"].items():
      assert error < 1e-4, (name, group, error)

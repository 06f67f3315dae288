"""The ``lab-optax`` command line: the paper's experiments, ``lab-optax mlp | cnn | lstm``."""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lab_optax.experiments import data as data_lib

METHOD_NAMES = ("fp", "bc", "bwn", "lab", "bnn", "xnor", "lab2")

# The paper's figures (Hou, Yao and Kwok, ICLR 2017, arXiv:1611.01600: Tables 1, 2 and 3), for
# the table printed at the end, keyed on (experiment, dataset). They are shown only beside runs
# of the paper's dataset and architecture: see _paper_figures.
PAPER = {
    ("mlp", "mnist"): {
        "fp": 1.190, "bc": 1.280, "bwn": 1.200, "lab": 1.170, "bnn": 1.470, "xnor": 1.450, "lab2": 1.380,
    },
    ("cnn", "cifar10"): {
        "fp": 11.900, "bc": 9.860, "bwn": 11.030, "lab": 10.500, "bnn": 12.870, "xnor": 12.370,
        "lab2": 12.280,
    },
    ("cnn", "svhn"): {
        "fp": 2.277, "bc": 2.450, "bwn": 2.531, "lab": 2.354, "bnn": 3.500, "xnor": 3.580, "lab2": 3.362,
    },
    ("lstm", "linux"): {
        "fp": 1.329, "bc": 3.532, "bwn": 1.327, "lab": 1.314, "bnn": 3.624, "xnor": 1.426, "lab2": 1.412,
    },
}  # fmt: skip

# Table 2: SVHN by the first block's filters K (FP, BinaryConnect, BWN and LAB only).
PAPER_SVHN_WIDTH = {
  16: {"fp": 2.738, "bc": 3.200, "bwn": 3.269, "lab": 3.050},
  32: {"fp": 2.585, "bc": 2.777, "bwn": 2.819, "lab": 2.742},
  64: {"fp": 2.277, "bc": 2.450, "bwn": 2.531, "lab": 2.354},
  128: {"fp": 2.146, "bc": 2.315, "bwn": 2.331, "lab": 2.200},
}

# The character LSTM's default split of the text (the paper's for Linux; War and Peace: 0.8,0.1,0.1).
DEFAULT_SPLIT = (0.9, 0.05, 0.05)


class UsageError(Exception):
  """A bad flag or flag combination; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # one line, no usage dump
    raise UsageError(message)


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def _learning_rate(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
  return value


def _split(text: str) -> tuple[float, float, float]:
  try:
    parts = tuple(float(f) for f in text.split(","))
  except ValueError:
    parts = ()
  if (
    len(parts) != 3
    or not all(math.isfinite(f) and f > 0 for f in parts)
    or abs(sum(parts) - 1.0) > 1e-6
  ):
    raise argparse.ArgumentTypeError(
      f"must be three positive fractions TRAIN,VAL,TEST summing to 1 (as 0.8,0.1,0.1), got {text}"
    )
  return parts


def _methods(text: str) -> list[str]:
  names = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in names if m not in METHOD_NAMES]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
      f"unknown method {unknown[0] if unknown else text!r}: choose from {', '.join(METHOD_NAMES)}"
    )
  return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="lab-optax",
    description="Reproduce the experiments of Loss-aware Binarization (Hou, Yao and Kwok, "
    "ICLR 2017) with lab_optax: FP, BinaryConnect (bc), BWN, LAB, BNN, XNOR and LAB2.",
  )
  sub = parser.add_subparsers(dest="experiment", required=True, parser_class=_Parser)

  def common(p: argparse.ArgumentParser, epochs_help: str, batch_help: str, lr_help: str) -> None:
    p.add_argument(
      "--methods",
      type=_methods,
      default=list(METHOD_NAMES),
      help="comma list of fp, bc, bwn, lab, bnn, xnor, lab2 (default: all seven)",
    )
    p.add_argument("--epochs", type=_positive, help=epochs_help)
    p.add_argument("--seeds", type=_positive, default=1, help="run seeds 0 to N-1 (default: 1)")
    p.add_argument("--batch-size", type=_positive, help=f"minibatch size (default: {batch_help})")
    p.add_argument(
      "--lr", type=_learning_rate, help=f"initial learning rate, > 0 (default: {lr_help})"
    )
    p.add_argument("--out", type=Path, help="directory for results.json and the plot")
    p.add_argument(
      "--devices",
      type=_positive,
      help="train data-parallel over the first N devices (default: all visible devices)",
    )
    p.add_argument(
      "--checkpoint-dir", type=Path, help="save every run after every epoch (orbax, atomic)"
    )
    p.add_argument(
      "--resume", action="store_true", help="continue the runs saved in --checkpoint-dir"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

  mlp = sub.add_parser(
    "mlp",
    help="Table 1's feedforward network (MNIST, or the embedded digits)",
    description="784FC-2048FC-2048FC-2048FC-10 with batch norm after every layer and the "
    "squared hinge loss; batch 100; lr 0.01 (LAB2 0.005), x0.1 after 30% and 50% of "
    "the epochs (the paper: epochs 15 and 25 of 50). On the embedded digits (default) the "
    "hidden layers have 256 units and the run lasts 30 epochs: about 2 seconds of training "
    "per method and seed, 17 seconds in all for the seven methods and one seed (measured on "
    "one CPU core).",
  )
  mlp.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
  mlp.add_argument("--data-dir", type=Path, help="directory of the four MNIST IDX files")
  mlp.add_argument(
    "--hidden", type=_positive, help="units per hidden layer (default: 2048; digits 256)"
  )
  common(mlp, "epochs (default: 50; digits 30)", "100", "0.01, LAB2 0.005")

  cnn = sub.add_parser(
    "cnn",
    help="the VGG-like net of Tables 1 and 2 (CIFAR-10, SVHN, or the embedded digits)",
    description="(2xK C3)-MP2-(2x2K C3)-MP2-(2x4K C3)-MP2-(2x1024FC)-10 with batch norm and "
    "the squared hinge loss, batch 50. CIFAR-10: K=128, lr 0.03 x0.5 every 15 of 200 epochs. "
    "SVHN: K=64, lr 0.001 x0.1 after epochs 15 and 25 of 50. Digits (default, 8x8 images): "
    "K=16, FC 128, lr 0.01, 20 epochs. --width K gives Table 2's sweep.",
  )
  cnn.add_argument("--dataset", choices=("digits", "cifar10", "svhn"), default="digits")
  cnn.add_argument(
    "--data-dir", type=Path, help="CIFAR-10 python batches or SVHN train/test .mat files"
  )
  cnn.add_argument(
    "--width", type=_positive, help="K, the first block's filters (cifar10 128, svhn 64, digits 16)"
  )
  cnn.add_argument("--fc", type=_positive, help="units of the two dense layers (1024; digits 128)")
  common(
    cnn,
    "epochs (default: cifar10 200, svhn 50, digits 20)",
    "50",
    "cifar10 0.03, svhn 0.001, digits 0.01",
  )

  lstm = sub.add_parser(
    "lstm",
    help="the character LSTM of Tables 3 and 4 (default text: the Linux kernel headers)",
    description="One LSTM layer with binarized weights and a full-precision softmax; Adam lr "
    "2e-3, x0.98 per epoch after 5% of the epochs (the paper: epoch 10 of 200), gradient "
    "clipping at 5; the text is split 90/5/5 by default (--split); test cross-entropy per "
    "character, in nats. The defaults (hidden 128, batch 50, timesteps 100, 2 epochs) run in "
    "minutes on a CPU; the paper used hidden 512, batch 100, timesteps 100 and 200 epochs, "
    "and split War and Peace 80/10/10 and the Linux source 90/5/5.",
  )
  lstm.add_argument(
    "--text",
    type=Path,
    help=f"a text file or a directory read recursively (default: {data_lib.DEFAULT_TEXT_PATH})",
  )
  lstm.add_argument(
    "--hidden", type=_positive, default=128, help="LSTM units (default: 128; paper: 512)"
  )
  lstm.add_argument(
    "--timesteps", type=_positive, default=100, help="unrolled steps (default and paper: 100)"
  )
  lstm.add_argument(
    "--split",
    type=_split,
    default=DEFAULT_SPLIT,
    metavar="TRAIN,VAL,TEST",
    help="fractions of the text for training, validation and test, in that order "
    "(default: 0.9,0.05,0.05, the paper's for Linux; War and Peace: 0.8,0.1,0.1)",
  )
  common(lstm, "epochs (default: 2; paper: 200)", "50; paper: 100", "0.002, the paper's")
  return parser


def _image_experiment(args: argparse.Namespace):
  from lab_optax.experiments import models, train

  if args.dataset != "digits" and args.data_dir is None:
    raise UsageError(f"--dataset {args.dataset} needs --data-dir DIR (nothing is downloaded)")
  dataset = data_lib.load_image_dataset(args.dataset, args.data_dir)
  digits = args.dataset == "digits"
  given_lr = args.lr is not None
  if args.experiment == "mlp":
    epochs = args.epochs or (30 if digits else 50)
    batch_size = args.batch_size or 100
    hidden = args.hidden or (256 if digits else 2048)
    in_features = int(np.prod(dataset.input_shape))
    # The paper's LAB2 rate is half the others'; --lr sets every method's.
    lr, lr_lab2 = (args.lr, args.lr) if given_lr else (0.01, 0.005)
    config = {"hidden": hidden, "lr": lr, "lr_lab2": lr_lab2}

    def make_model(method, rngs):
      return models.MLP(in_features, dataset.num_classes, hidden=hidden, method=method, rngs=rngs)

    def schedule(method):
      base = lr_lab2 if method.name == "lab2" else lr
      return train.step_schedule(base, (0.3, 0.5), 0.1, epochs)

  else:
    defaults = {
      "digits": (16, 128, 20, 0.01),
      "cifar10": (128, 1024, 200, 0.03),
      "svhn": (64, 1024, 50, 0.001),
    }
    width, fc, default_epochs, lr = defaults[args.dataset]
    width, fc = args.width or width, args.fc or fc
    epochs = args.epochs or default_epochs
    batch_size = args.batch_size or 50
    lr = args.lr if given_lr else lr
    config = {"width": width, "fc": fc, "lr": lr}

    def make_model(method, rngs):
      return models.VGG(
        dataset.input_shape, dataset.num_classes, width=width, fc=fc, method=method, rngs=rngs
      )

    def schedule(method):
      if args.dataset == "cifar10":
        return train.exponential_schedule(lr, 15 / 200, 0.5, 0.0, epochs)
      return train.step_schedule(lr, (0.3, 0.5), 0.1, epochs)

  # Before anything is written: training drops the last partial batch, so it needs one whole.
  n_train = len(dataset.train.labels)
  if n_train < batch_size:
    raise UsageError(
      f"--batch-size {batch_size} is larger than the {n_train} training examples of "
      f"{args.dataset}: lower --batch-size"
    )

  def task_for(method):
    return train.classification_task(
      dataset, make_model, batch_size=batch_size, learning_rate=schedule(method)
    )

  config.update(dataset=args.dataset, batch_size=batch_size, epochs=epochs)
  return task_for, config, _paper_figures(args.experiment, config)


def _paper_figures(experiment: str, config: dict[str, Any]) -> dict[str, float] | None:
  """The paper's figures for a run of its dataset and architecture, else ``None``.

  MLP: MNIST with 2048 hidden units (Table 1). VGG: CIFAR-10 with K = 128 (Table 1), SVHN with
  K = 64 (Table 1, all seven methods) or K = 16, 32, 128 (Table 2: FP, BinaryConnect, BWN and
  LAB), both with 1024-unit dense layers. LSTM: the default Linux text with 512 units, 100
  timesteps and the 90/5/5 split (Table 3). Training settings (epochs, batch size, learning rate)
  may differ; the figure then is the paper's target, not a prediction for the run.
  """
  dataset = config.get("dataset")
  if experiment == "mlp":
    match = dataset == "mnist" and config["hidden"] == 2048
    return PAPER[("mlp", "mnist")] if match else None
  if experiment == "cnn":
    if config["fc"] != 1024:
      return None
    if dataset == "cifar10" and config["width"] == 128:
      return PAPER[("cnn", "cifar10")]
    if dataset == "svhn" and config["width"] == 64:
      return PAPER[("cnn", "svhn")]
    if dataset == "svhn":
      return PAPER_SVHN_WIDTH.get(config["width"])
    return None
  match = (
    config.get("default_text")
    and config["hidden"] == 512
    and config["timesteps"] == 100
    and tuple(config["split"]) == DEFAULT_SPLIT
  )
  return PAPER[("lstm", "linux")] if match else None


def _lstm_experiment(args: argparse.Namespace):
  from lab_optax.experiments import models, train

  text_path = args.text or Path(data_lib.DEFAULT_TEXT_PATH)
  if args.text is None and not text_path.exists():
    raise UsageError(
      f"no text given and the default corpus {text_path} is absent: pass --text FILE_OR_DIR"
    )
  corpus = data_lib.make_char_dataset(data_lib.load_text(text_path), split=args.split)
  epochs = args.epochs or 2
  batch_size = args.batch_size or 50
  needed = batch_size * args.timesteps + 1
  for name, ids in (("training", corpus.train), ("validation", corpus.val), ("test", corpus.test)):
    if len(ids) < needed:
      raise UsageError(
        f"{text_path} is too short: its {name} split has {len(ids)} characters, but one batch "
        f"of --batch-size {batch_size} x --timesteps {args.timesteps} needs {needed}; lower "
        "them or pass a longer --text"
      )
  lr = args.lr if args.lr is not None else 2e-3
  schedule = train.exponential_schedule(lr, 1 / 200, 0.98, 10 / 200, epochs)

  def make_model(method, rngs):
    return models.CharLSTM(corpus.vocab_size, args.hidden, method=method, rngs=rngs)

  task = train.language_model_task(
    corpus,
    make_model,
    batch_size=batch_size,
    timesteps=args.timesteps,
    learning_rate=schedule,
    grad_clip=5.0,
  )
  config = {
    "text": str(text_path),
    "characters": len(corpus.train) + len(corpus.val) + len(corpus.test),
    "vocab_size": corpus.vocab_size,
    "hidden": args.hidden,
    "timesteps": args.timesteps,
    "split": list(args.split),
    "batch_size": batch_size,
    "lr": lr,
    "epochs": epochs,
  }
  paper = _paper_figures("lstm", {**config, "default_text": args.text is None})
  return (lambda method: task), config, paper


def summarize(records: Sequence[dict[str, Any]], metric: str, paper: dict | None) -> str:
  """The terminal table: mean +- std over seeds per method, beside the paper's figure.

  The "paper" column appears when ``paper`` has a figure for at least one of the methods run;
  a method without one gets "-".
  """
  from lab_optax.experiments.models import METHODS

  names = list(dict.fromkeys(r["method"] for r in records))
  show_paper = bool(paper) and any(name in paper for name in names)
  unit = "test error (%)" if metric == "test_error" else "test cross-entropy (nats/char)"
  header = ["method", "seeds", unit] + (["paper"] if show_paper else [])
  rows = []
  for name in names:
    values = np.array([r[metric] for r in records if r["method"] == name], np.float64)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    row = [METHODS[name].label, str(len(values)), f"{values.mean():.3f} +- {std:.3f}"]
    if show_paper:
      row.append(f"{paper[name]:.3f}" if name in paper else "-")
    rows.append(row)
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _write_atomic(path: Path, write) -> None:
  """Writes through a temporary file in the same directory, then renames it into place.

  The file gets the mode a plain ``open(path, "w")`` would give it (0o666 less the umask),
  not the 0o600 of ``tempfile.mkstemp``.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def render_curves(records: Sequence[dict[str, Any]], metric: str, title: str) -> bytes:
  """Validation curves per method (mean over seeds), as the bytes of a PNG."""
  import io

  import matplotlib
  import matplotlib.ticker

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in dict.fromkeys(r["method"] for r in records):
    runs = [r for r in records if r["method"] == name]
    length = min(len(r["val_curve"]) for r in runs)
    curve = np.mean([r["val_curve"][:length] for r in runs], axis=0)
    ax.plot(np.arange(1, length + 1), curve, marker="o", markersize=3, label=runs[0]["label"])
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel("epoch")
  ax.set_ylabel("validation error (%)" if metric == "test_error" else "validation nats/char")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, format="png", dpi=120)
  finally:
    plt.close(fig)
  return buffer.getvalue()


def plot_curves(records: Sequence[dict[str, Any]], metric: str, path: Path, title: str) -> None:
  """Validation curves per method (mean over seeds) as a PNG file at ``path``."""
  png = render_curves(records, metric, title)
  _write_atomic(path, lambda f: f.write(png))


def _run(args: argparse.Namespace) -> int:
  import jax
  from tqdm.auto import tqdm

  import lab_optax
  from lab_optax.experiments import models, train

  if args.resume and args.checkpoint_dir is None:
    raise UsageError("--resume needs --checkpoint-dir DIR")
  try:  # before the data are loaded: a wrong --devices fails at once
    mesh = train.make_mesh(args.devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if args.experiment == "lstm":
    task_for, config, paper = _lstm_experiment(args)
  else:
    task_for, config, paper = _image_experiment(args)
  devices = mesh.devices.size
  if config["batch_size"] % devices:
    raise UsageError(
      f"--batch-size {config['batch_size']} must be divisible by the {devices} devices"
    )
  config.update(
    experiment=args.experiment,
    methods=args.methods,
    seeds=args.seeds,
    devices=devices,
    platform=jax.devices()[0].platform,
    lab_optax_version=lab_optax.__version__,
    jax_version=jax.__version__,
    machine=platform.machine(),
  )
  out = args.out or Path("runs") / args.experiment
  if args.checkpoint_dir is not None:
    _check_checkpoint_config(args.checkpoint_dir, config, args.resume)
    if args.resume and not _has_finished_runs(args.checkpoint_dir):
      print(
        f"lab-optax: --resume: no finished epoch in {args.checkpoint_dir}, starting afresh",
        file=sys.stderr,
      )

  records = []
  for name in args.methods:
    method = models.METHODS[name]
    task = task_for(method)
    for seed in range(args.seeds):
      ckpt = args.checkpoint_dir / f"{name}-seed{seed}" if args.checkpoint_dir else None
      result = train.run(
        task,
        method,
        seed,
        epochs=config["epochs"],
        mesh=mesh,
        checkpoint_dir=ckpt,
        resume=args.resume,
        progress=None if args.no_progress else tqdm,
      )
      records.append(result.record())
  metric = task.metric
  results = {"config": config, "results": records}
  return _write_outputs(out, results, metric, paper, args.experiment)


def _write_outputs(
  out: Path, results: dict[str, Any], metric: str, paper: dict | None, experiment: str
) -> int:
  """Writes the plot, then results.json, and prints the table; returns the exit status.

  results.json comes last, so its presence means a finished pair. The plot is drawn in
  memory first; if drawing fails, the results are still saved (they cost a training run) but
  any older plot in ``out`` is removed, so that no plot of another run sits beside them, and
  the failure is reported with exit status 1.
  """
  records, config = results["results"], results["config"]
  title = f"lab-optax {experiment} on {config.get('dataset') or config['text']}"
  plot_path, results_path = out / "validation_curves.png", out / "results.json"
  try:
    png = render_curves(records, metric, title)
  except Exception as e:  # noqa: BLE001 -- any plotting failure: keep the results
    png, plot_error = None, e
  if png is not None:
    _write_atomic(plot_path, lambda f: f.write(png))
  else:
    plot_path.unlink(missing_ok=True)
  _write_atomic(results_path, lambda f: f.write(json.dumps(results, indent=2).encode()))
  print(summarize(records, metric, paper))
  if png is None:
    print(
      f"lab-optax: error: results: {results_path}, but the plot failed "
      f"({type(plot_error).__name__}: {plot_error}); no {plot_path.name} was written",
      file=sys.stderr,
    )
    return 1
  print(f"results: {results_path}, plot: {plot_path}")
  return 0


def _check_checkpoint_config(directory: Path, config: dict[str, Any], resume: bool) -> None:
  """Refuses to mix runs of different configurations in one checkpoint directory."""
  keys = (
    "experiment",
    "dataset",
    "text",
    "hidden",
    "width",
    "fc",
    "timesteps",
    "split",
    "batch_size",
    "lr",
    "lr_lab2",
    "epochs",
  )
  wanted = {k: config[k] for k in keys if k in config}
  saved_path = directory / "config.json"
  # Only runs that finished an epoch count: a run that failed before its first checkpoint (or
  # orbax's temporary directory of an interrupted save) holds nothing to resume or protect.
  if _has_finished_runs(directory):
    if not resume:
      raise UsageError(
        f"--checkpoint-dir {directory} already holds runs: pass --resume to continue them, "
        "or choose an empty directory"
      )
    if saved_path.exists():
      try:
        saved = json.loads(saved_path.read_text())
      except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {saved_path}: {e}") from None
      if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise UsageError(
          f"--resume: the checkpoints in {directory} were made with other settings "
          f"({', '.join(diff)}); use the same flags or another --checkpoint-dir"
        )
  _write_atomic(saved_path, lambda f: f.write(json.dumps(wanted, indent=2).encode()))


def _has_finished_runs(directory: Path) -> bool:
  """Whether a run in ``directory`` saved at least one finished epoch."""
  return directory.is_dir() and any(_has_finished_step(p) for p in directory.iterdir())


def _has_finished_step(run_dir: Path) -> bool:
  """Whether ``run_dir`` holds a step that orbax finished (a directory named by the step)."""
  return run_dir.is_dir() and any(p.is_dir() and p.name.isdigit() for p in run_dir.iterdir())


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``lab-optax`` console script; returns the exit status."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
    return _run(args)
  except (UsageError, data_lib.DataError) as e:
    print(f"lab-optax: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"lab-optax: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("lab-optax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())

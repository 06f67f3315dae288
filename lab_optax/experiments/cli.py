"""The ``lab-optax`` command line: the paper's experiments and the report of separate runs.

``lab-optax mlp | cnn | lstm`` trains the networks of the LAB paper's Section 4
with the methods of ``--methods`` (the paper's seven, and the follow-up's
ternary and m-bit ones); ``lab-optax report DIR [DIR ...]`` merges the
results.json of separate runs into one table. The defaults and the paper's
figures come from :mod:`lab_optax.experiments.settings`, the table and the
plot from :mod:`lab_optax.experiments.report`.
"""

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lab_optax._src.files import write_atomic
from lab_optax.experiments import data as data_lib
from lab_optax.experiments import models, report, settings
from lab_optax.experiments.models import LAQ_BITS, METHODS, PAPER_METHODS

_LAQ_RANGE = f"N = {LAQ_BITS[0]} to {LAQ_BITS[-1]}"
_METHODS_HEADING = "methods (--methods NAME,NAME,...; default: the LAB paper's seven, fp to lab2):"


class UsageError(Exception):
  """A bad flag or flag combination; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # one line, no usage dump
    raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
  """Wraps the description, and keeps the method list of the epilog one method a line."""

  def _fill_text(self, text: str, width: int, indent: str) -> str:
    if text.startswith(_METHODS_HEADING):
      return "".join(indent + line for line in text.splitlines(keepends=True))
    return super()._fill_text(text, width, indent)


def _method_list() -> str:
  """The epilog of the experiments' help: one line per method (one for laqN, one for laqN-log)."""
  lines = [(m.name, m.description) for m in METHODS.values() if not m.name.startswith("laq")]
  lines += [(m.name, m.description) for m in (METHODS["laq3"], METHODS["laq3-log"])]
  lines += [
    ("laqN", f"LAQ, N-bit weights on linear levels, {_LAQ_RANGE} (laq2 is ternary)"),
    ("laqN-log", f"LAQ, N-bit weights on logarithmic levels, {_LAQ_RANGE}"),
  ]
  width = max(len(name) for name, _ in lines)
  body = "\n".join(f"  {name.ljust(width)}  {text}" for name, text in lines)
  return (
    f"{_METHODS_HEADING}\n{body}\n"
    "The ternary and m-bit methods quantize the weights only (real activations, like lab)."
  )


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
  unknown = [m for m in names if m not in METHODS]
  if unknown or not names:
    choices = [name for name in METHODS if not name.startswith("laq")]
    raise argparse.ArgumentTypeError(
      f"unknown method {unknown[0] if unknown else text!r}: choose from {', '.join(choices)}, "
      f"laqN, laqN-log ({_LAQ_RANGE}); see --help"
    )
  return list(dict.fromkeys(names))


def _defaults(experiment: str, value: Callable[[settings.Setting], Any]) -> str:
  """A default of every data set of ``experiment``: one value, or "name value, ..." (digits last)."""
  names = sorted(settings.datasets(experiment), key=lambda name: name == "digits")
  values = {name: f"{value(settings.SETTINGS[(experiment, name)]):g}" for name in names}
  if len(set(values.values())) == 1:
    return values[names[0]]
  return ", ".join(f"{name} {v}" for name, v in values.items())


def _lstm_default(key: str) -> str:
  """The LSTM's default of ``key`` beside the paper's: "2; paper: 200", or "default and paper"."""
  setting = settings.SETTINGS[("lstm", "text")]
  default = setting.sizes[key] if key in setting.sizes else getattr(setting, key)
  paper = setting.paper_setting.get(key)
  if paper == default:
    return f"default and paper: {default}"
  return f"default: {default}" + ("" if paper is None else f"; paper: {paper}")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="lab-optax",
    description="Reproduce the experiments of Loss-aware Binarization (Hou, Yao and Kwok, "
    "ICLR 2017) with lab_optax: FP, BinaryConnect (bc), BWN, LAB, BNN, XNOR and LAB2, and the "
    "follow-up's ternary and m-bit methods (LAT, LAQ; TWN and BitNet's absmean as baselines). "
    "`lab-optax report` merges the results of separate runs into one table.",
  )
  sub = parser.add_subparsers(dest="experiment", required=True, parser_class=_Parser)

  def experiment(name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(
      name,
      help=help,
      description=description,
      epilog=_method_list(),
      formatter_class=_HelpFormatter,
    )

  def common(p: argparse.ArgumentParser, epochs_help: str, batch_help: str, lr_help: str) -> None:
    p.add_argument(
      "--methods",
      type=_methods,
      default=list(PAPER_METHODS),
      help=f"comma list of the methods below (default: {', '.join(PAPER_METHODS)}, the LAB "
      "paper's seven)",
    )
    p.add_argument("--epochs", type=_positive, help=f"epochs (default: {epochs_help})")
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
    p.add_argument(
      "--export",
      type=Path,
      metavar="DIR",
      help="write each quantized run's final model, packed (batch norms folded where the model "
      "can), to DIR/METHOD-seedSEED.npz, and report its test figure loaded from that file",
    )

  def image_defaults(p: argparse.ArgumentParser, name: str) -> None:
    mlp_lr = settings.SETTINGS[(name, "digits")].method_lr
    own = "".join(f", {METHODS[m].label} {lr:g}" for m, lr in mlp_lr.items())
    common(
      p,
      _defaults(name, lambda s: s.epochs),
      _defaults(name, lambda s: s.batch_size),
      _defaults(name, lambda s: s.lr) + own,
    )

  mlp = experiment(
    "mlp",
    help="Table 1's feedforward network (MNIST, or the embedded digits)",
    description="784FC-2048FC-2048FC-2048FC-10 with batch norm after every layer and the "
    "squared hinge loss; batch 100; lr 0.01 (LAB2 0.005), x0.1 after 30% and 50% of "
    "the epochs (the paper: epochs 15 and 25 of 50). On the embedded digits (default) the "
    "hidden layers have 256 units and the run lasts 30 epochs: about 2 seconds of training "
    "per method and seed, 17 seconds in all for the seven methods and one seed (measured on "
    "one CPU core).",
  )
  mlp.add_argument("--dataset", choices=settings.datasets("mlp"), default="digits")
  mlp.add_argument("--data-dir", type=Path, help="directory of the four MNIST IDX files")
  mlp.add_argument(
    "--hidden",
    type=_positive,
    help=f"units per hidden layer (default: {_defaults('mlp', lambda s: s.sizes['hidden'])})",
  )
  image_defaults(mlp, "mlp")

  cnn = experiment(
    "cnn",
    help="the VGG-like net of Tables 1 and 2 (CIFAR-10, SVHN, or the embedded digits)",
    description="(2xK C3)-MP2-(2x2K C3)-MP2-(2x4K C3)-MP2-(2x1024FC)-10 with batch norm and "
    "the squared hinge loss, batch 50. CIFAR-10: K=128, lr 0.03 x0.5 every 15 of 200 epochs. "
    "SVHN: K=64, lr 0.001 x0.1 after epochs 15 and 25 of 50. Digits (default, 8x8 images): "
    "K=16, FC 128, lr 0.01, 20 epochs. --width K gives Table 2's sweep.",
  )
  cnn.add_argument("--dataset", choices=settings.datasets("cnn"), default="digits")
  cnn.add_argument(
    "--data-dir", type=Path, help="CIFAR-10 python batches or SVHN train/test .mat files"
  )
  cnn.add_argument(
    "--width",
    type=_positive,
    help=f"K, the first block's filters (default: {_defaults('cnn', lambda s: s.sizes['width'])})",
  )
  cnn.add_argument(
    "--fc",
    type=_positive,
    help=f"units of the two dense layers (default: {_defaults('cnn', lambda s: s.sizes['fc'])})",
  )
  image_defaults(cnn, "cnn")

  text = settings.SETTINGS[("lstm", "text")]
  split = ",".join(f"{f:g}" for f in text.split)
  lstm = experiment(
    "lstm",
    help="the character LSTM of Tables 3 and 4 (default text: the Linux kernel headers)",
    description="One LSTM layer with quantized weights and a full-precision softmax; Adam lr "
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
  lstm.add_argument("--hidden", type=_positive, help=f"LSTM units ({_lstm_default('hidden')})")
  lstm.add_argument(
    "--timesteps", type=_positive, help=f"unrolled steps ({_lstm_default('timesteps')})"
  )
  lstm.add_argument(
    "--split",
    type=_split,
    metavar="TRAIN,VAL,TEST",
    help="fractions of the text for training, validation and test, in that order "
    f"(default: {split}, the paper's for Linux; War and Peace: 0.8,0.1,0.1)",
  )
  common(
    lstm,
    _lstm_default("epochs").removeprefix("default: "),
    _lstm_default("batch_size").removeprefix("default: "),
    f"{text.lr:g}, the paper's",
  )

  merge = sub.add_parser(
    "report",
    help="merge the results.json of separate runs into one table",
    description="Reads the results.json that each run wrote into its --out directory and prints "
    "one table of them all (mean +- std over seeds per method, beside the paper's figure where "
    "the runs are of its setting), as a single run with every method would. The runs must be of "
    "one experiment and setting (data set, sizes, batch size, learning rates, epochs); only "
    "their methods and seeds may differ, and no method and seed may appear twice.",
  )
  merge.add_argument(
    "runs",
    nargs="+",
    type=Path,
    metavar="DIR",
    help="a run's --out directory (or its results.json)",
  )
  merge.add_argument(
    "--out", type=Path, help="write the merged results.json and validation_curves.png here"
  )
  return parser


def _image_tasks(args: argparse.Namespace, sizes: dict[str, int], batch_size: int):
  """``(make_task, config)`` of the MLP or the VGG on ``args.dataset``."""
  from lab_optax.experiments import train

  if args.dataset != "digits" and args.data_dir is None:
    raise UsageError(f"--dataset {args.dataset} needs --data-dir DIR (nothing is downloaded)")
  dataset = data_lib.load_image_dataset(args.dataset, args.data_dir)
  data_lib.check_batch_fits(
    {"training": len(dataset.train.labels)},
    batch_size,
    source=args.dataset,
    batch=f"--batch-size {batch_size}",
    unit="examples",
    fix="lower --batch-size",
  )

  def make_model(method, rngs):
    if args.experiment == "mlp":
      in_features = int(np.prod(dataset.input_shape))
      return models.MLP(in_features, dataset.num_classes, method=method, rngs=rngs, **sizes)
    return models.VGG(dataset.input_shape, dataset.num_classes, method=method, rngs=rngs, **sizes)

  def make_task(schedule):
    return train.classification_task(
      dataset, make_model, batch_size=batch_size, learning_rate=schedule
    )

  return make_task, {"dataset": args.dataset}


def _text_tasks(args: argparse.Namespace, sizes: dict[str, int], batch_size: int):
  """``(make_task, config)`` of the character LSTM on ``args.text``."""
  from lab_optax.experiments import train

  setting = settings.SETTINGS[("lstm", "text")]
  text_path = args.text or Path(data_lib.DEFAULT_TEXT_PATH)
  if args.text is None and not text_path.exists():
    raise UsageError(
      f"no text given and the default corpus {text_path} is absent: pass --text FILE_OR_DIR"
    )
  split = args.split or setting.split
  corpus = data_lib.make_char_dataset(data_lib.load_text(text_path), split=split)
  timesteps = sizes["timesteps"]
  data_lib.check_batch_fits(
    {"training": len(corpus.train), "validation": len(corpus.val), "test": len(corpus.test)},
    batch_size * timesteps + 1,
    source=str(text_path),
    batch=f"--batch-size {batch_size} x --timesteps {timesteps}",
    unit="characters",
    fix="lower them or pass a longer --text",
  )

  def make_model(method, rngs):
    return models.CharLSTM(corpus.vocab_size, sizes["hidden"], method=method, rngs=rngs)

  def make_task(schedule):
    return train.language_model_task(
      corpus,
      make_model,
      batch_size=batch_size,
      timesteps=timesteps,
      learning_rate=schedule,
      grad_clip=setting.grad_clip,
    )

  config = {
    "text": str(text_path),
    "characters": len(corpus.train) + len(corpus.val) + len(corpus.test),
    "vocab_size": corpus.vocab_size,
    "split": list(split),
  }
  return make_task, config


def _experiment(args: argparse.Namespace):
  """``(task_for, config)``: the task of each method, and the run's settings, flags filled in.

  Every flag not given takes the default of the experiment's and data set's setting.
  """
  setting = settings.SETTINGS[(args.experiment, getattr(args, "dataset", "text"))]
  sizes = {key: getattr(args, key) or value for key, value in setting.sizes.items()}
  epochs = args.epochs or setting.epochs
  batch_size = args.batch_size or setting.batch_size
  tasks = _text_tasks if args.experiment == "lstm" else _image_tasks
  make_task, data_config = tasks(args, sizes, batch_size)
  by_lr = {}  # one task per learning rate: methods with the same one share it

  def task_for(method):
    lr = setting.learning_rate(method.name, args.lr)
    if lr not in by_lr:
      by_lr[lr] = make_task(setting.schedule.make(lr, epochs))
    return by_lr[lr]

  config = {
    "experiment": args.experiment,
    **data_config,
    **sizes,
    "batch_size": batch_size,
    **setting.learning_rates(args.lr),
    "epochs": epochs,
  }
  return task_for, config


def _run(args: argparse.Namespace) -> int:
  import jax
  from tqdm.auto import tqdm

  import lab_optax
  from lab_optax.experiments import export, train

  if args.resume and args.checkpoint_dir is None:
    raise UsageError("--resume needs --checkpoint-dir DIR")
  try:  # before the data are loaded: a wrong --devices fails at once
    mesh = train.make_mesh(args.devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  task_for, config = _experiment(args)
  devices = mesh.devices.size
  if config["batch_size"] % devices:
    raise UsageError(
      f"--batch-size {config['batch_size']} must be divisible by the {devices} devices"
    )
  config.update(
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
    method = METHODS[name]
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
      record = result.record()
      if args.export is not None:
        exported = export.export_run(task, result, args.export, mesh)
        if exported is not None:
          record["export"] = exported
      records.append(record)
  return report.write_outputs(out, {"config": config, "results": records})


def _report(args: argparse.Namespace) -> int:
  """``lab-optax report``: the table of separate runs, and with --out their merged results."""
  merged = report.merge_results([report.load_results(path) for path in args.runs])
  if args.out is not None:
    return report.write_outputs(args.out, merged)
  print(report.tables(merged))
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
  write_atomic(saved_path, lambda f: f.write(json.dumps(wanted, indent=2).encode()))


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
    return _report(args) if args.experiment == "report" else _run(args)
  except (UsageError, data_lib.DataError, report.ReportError) as e:
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

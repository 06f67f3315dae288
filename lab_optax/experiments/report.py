"""Reporting of the experiments: the table, the validation curves, results.json, and merging runs.

Each run of ``lab-optax mlp | cnn | lstm`` writes ``results.json``
(``{"config": {...}, "results": [one record per method and seed]}``) and
``validation_curves.png`` into its ``--out`` directory, and prints the table of
:func:`summarize`. ``lab-optax report DIR [DIR ...]`` reads the results of
separate runs (one method per run, say, each resumable on its own), checks that
they are runs of one setting, and prints the same table for all of them
(:func:`load_results`, :func:`merge_results`).
"""

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lab_optax._src.files import write_atomic
from lab_optax.experiments import settings

RESULTS_FILE = "results.json"
PLOT_FILE = "validation_curves.png"

#: Config entries that may differ between runs merged into one table: where a run trained
#: (and, in a merged file, the files it merged). Any difference but these and the methods and
#: seeds is another experiment.
WHERE_KEYS = ("devices", "platform", "lab_optax_version", "jax_version", "machine")
PER_RUN_KEYS = ("methods", "seeds", *WHERE_KEYS, "merged_from")


class ReportError(Exception):
  """A results file that is missing, unreadable or of another setting; one line naming it."""


def _label(name: str, records: Sequence[Mapping[str, Any]]) -> str:
  label = next((r["label"] for r in records if r["method"] == name and "label" in r), None)
  if label is None:
    from lab_optax.experiments.models import METHODS

    label = METHODS[name].label if name in METHODS else name
  return label


def summarize(
  records: Sequence[Mapping[str, Any]], metric: str, paper: Mapping[str, float] | None
) -> str:
  """The terminal table: mean +- std over seeds per method, beside the paper's figure.

  The "paper" column appears when ``paper`` has a figure for at least one of the methods run;
  a method without one gets "-".
  """
  names = list(dict.fromkeys(r["method"] for r in records))
  show_paper = bool(paper) and any(name in paper for name in names)
  unit = "test error (%)" if metric == "test_error" else "test cross-entropy (nats/char)"
  header = ["method", "seeds", unit] + (["paper"] if show_paper else [])
  rows = []
  for name in names:
    values = np.array([r[metric] for r in records if r["method"] == name], np.float64)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    row = [_label(name, records), str(len(values)), f"{values.mean():.3f} +- {std:.3f}"]
    if show_paper:
      row.append(f"{paper[name]:.3f}" if name in paper else "-")
    rows.append(row)
  return _table(header, rows)


def summarize_exports(records: Sequence[Mapping[str, Any]], metric: str) -> str | None:
  """The table of the runs exported with ``--export``, or ``None`` when there are none.

  One row per exported run: its file's size against the model's parameters in float32, the
  mean bits per packed weight, and the test figure of the float model at the last epoch beside
  that of the model loaded from the file.
  """
  exported = [r for r in records if isinstance(r.get("export"), Mapping)]
  if not exported:
    return None
  figure = "error %" if metric == "test_error" else "nats/char"
  header = ["method", "seed", "file", "KiB", "vs float32", "bits/weight"]
  header += [f"float {figure}", f"packed {figure}"]
  rows = []
  for r in exported:
    e = r["export"]
    bits = e.get("bits_per_weight")
    rows.append(
      [
        _label(r["method"], records),
        str(r["seed"]),
        str(e["file"]),
        f"{e['bytes'] / 1024:.1f}",
        f"{e['float32_bytes'] / e['bytes']:.2f}x smaller",
        "-" if bits is None else f"{bits:.2f}",
        f"{e[f'{metric}_float']:.3f}",
        f"{e[f'{metric}_packed']:.3f}",
      ]
    )
  return "exported (the last epoch's model, packed, loaded back from its file):\n" + _table(
    header, rows
  )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Left-aligned columns two spaces apart, the header underlined."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def tables(results: Mapping[str, Any]) -> str:
  """What a run prints: :func:`summarize`, and :func:`summarize_exports` when runs were exported."""
  records, config = results["results"], results["config"]
  metric = settings.METRICS[config["experiment"]]
  text = summarize(records, metric, settings.paper_figures(config))
  exports = summarize_exports(records, metric)
  return text if exports is None else f"{text}\n\n{exports}"


def render_curves(records: Sequence[Mapping[str, Any]], metric: str, title: str) -> bytes:
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
    ax.plot(np.arange(1, length + 1), curve, marker="o", markersize=3, label=_label(name, runs))
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


def write_outputs(out: Path, results: Mapping[str, Any]) -> int:
  """Writes the plot, then results.json, and prints the table; returns the exit status.

  results.json comes last, so its presence means a finished pair. The plot is drawn in
  memory first; if drawing fails, the results are still saved (they cost a training run) but
  any older plot in ``out`` is removed, so that no plot of another run sits beside them, and
  the failure is reported with exit status 1.
  """
  records, config = results["results"], results["config"]
  metric = settings.METRICS[config["experiment"]]
  title = f"lab-optax {config['experiment']} on {config.get('dataset') or config['text']}"
  plot_path, results_path = out / PLOT_FILE, out / RESULTS_FILE
  try:
    png = render_curves(records, metric, title)
  except Exception as e:  # noqa: BLE001 -- any plotting failure: keep the results
    png, plot_error = None, e
  if png is not None:
    write_atomic(plot_path, lambda f: f.write(png))
  else:
    plot_path.unlink(missing_ok=True)
  write_atomic(results_path, lambda f: f.write(json.dumps(results, indent=2).encode()))
  print(tables(results))
  if png is None:
    print(
      f"lab-optax: error: results: {results_path}, but the plot failed "
      f"({type(plot_error).__name__}: {plot_error}); no {plot_path.name} was written",
      file=sys.stderr,
    )
    return 1
  print(f"results: {results_path}, plot: {plot_path}")
  return 0


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def load_results(path: str | Path) -> tuple[Path, dict[str, Any]]:
  """Reads and checks one run's results: ``path`` is its results.json or the directory of it.

  Returns:
    ``(file, results)``: the file read, and its contents.

  Raises:
    ReportError: a missing, unreadable or malformed file, named in one line.
  """
  path = Path(path)
  file = path / RESULTS_FILE if path.is_dir() else path
  if not file.exists():
    where = f"no {RESULTS_FILE} in {path}" if path.is_dir() else f"{path} does not exist"
    raise ReportError(f"{where}: give the --out directory of a finished run")
  try:
    results = json.loads(file.read_text())
  except OSError as e:
    raise ReportError(f"cannot read {file}: {e.strerror or e}") from None
  except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
    raise ReportError(f"{file} is not valid JSON ({e}): rerun its experiment") from None
  config = results.get("config") if isinstance(results, dict) else None
  records = results.get("results") if isinstance(results, dict) else None
  if not (isinstance(config, dict) and isinstance(records, list)):
    raise ReportError(
      f'{file} is not a lab-optax results file: it needs {{"config": {{...}}, "results": [...]}}'
    )
  experiment = config.get("experiment")
  if experiment not in settings.METRICS:
    raise ReportError(f"{file}: unknown experiment {experiment!r} in its config")
  metric = settings.METRICS[experiment]
  for i, record in enumerate(records):
    ok = (
      isinstance(record, dict)
      and isinstance(record.get("method"), str)
      and isinstance(record.get("seed"), int)
      and _is_number(record.get(metric))
      and isinstance(record.get("val_curve"), list)
    )
    if not ok:
      raise ReportError(
        f"{file}: record {i} needs a method, a seed, a {metric} and a val_curve; rerun its "
        "experiment"
      )
    export = record.get("export")
    if export is not None and not (
      isinstance(export, dict)
      and isinstance(export.get("file"), str)
      and all(_is_number(export.get(k)) for k in ("bytes", "float32_bytes"))
      and all(_is_number(export.get(f"{metric}_{k}")) for k in ("float", "packed"))
    ):
      raise ReportError(
        f"{file}: record {i} has an export entry without its file, sizes and {metric}_float and "
        f"{metric}_packed; rerun its experiment with --export"
      )
  return file, results


def merge_results(runs: Sequence[tuple[Path, Mapping[str, Any]]]) -> dict[str, Any]:
  """Merges the results of separate runs of one setting into one results dict.

  The runs must agree on every config entry but :data:`PER_RUN_KEYS` (the same
  experiment, data set, sizes, batch size, learning rates and epochs), and no
  (method, seed) may appear twice. The merged config is the first run's, with
  ``methods`` the methods of all runs, ``seeds`` the most seeds of any method,
  an entry of :data:`WHERE_KEYS` that differs between runs as the list of its
  values, and ``merged_from`` the files read (for a merged file, the files it
  merged). The records are grouped by method, in the order the methods first
  appear, then by seed.

  Args:
    runs: ``(file, results)`` pairs, as :func:`load_results` returns them.

  Raises:
    ReportError: runs of different settings, or a (method, seed) twice.
  """
  (first_file, first), *_ = runs
  reference = {k: v for k, v in first["config"].items() if k not in PER_RUN_KEYS}
  owner: dict[tuple[str, int], Path] = {}
  for file, results in runs:
    config = {k: v for k, v in results["config"].items() if k not in PER_RUN_KEYS}
    if config != reference:
      diff = sorted(k for k in set(config) | set(reference) if config.get(k) != reference.get(k))
      raise ReportError(
        f"{file} is a run of other settings than {first_file} ({', '.join(diff)}): only runs "
        "that differ in their methods and seeds merge into one table"
      )
    for record in results["results"]:
      key = (record["method"], record["seed"])
      if key in owner:
        raise ReportError(
          f"{file} and {owner[key]} both hold {key[0]} seed {key[1]}: pass only one of them"
        )
      owner[key] = file
  records = [r for _, results in runs for r in results["results"]]
  methods = list(dict.fromkeys(r["method"] for r in records))
  records.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
  config = dict(first["config"])
  config["methods"] = methods
  config["seeds"] = max(sum(r["method"] == m for r in records) for m in methods) if methods else 0
  for key in WHERE_KEYS:
    if key in config:
      values = _distinct(results["config"].get(key) for _, results in runs)
      config[key] = values[0] if len(values) == 1 else values
  config["merged_from"] = _distinct(
    results["config"].get("merged_from", [str(file)]) for file, results in runs
  )
  return {"config": config, "results": records}


def _distinct(values: Iterable[Any]) -> list[Any]:
  """The distinct values, in order; a list value counts as its items."""
  distinct = []
  for value in values:
    for v in value if isinstance(value, list) else [value]:
      if v not in distinct:
        distinct.append(v)
  return distinct

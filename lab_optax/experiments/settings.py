"""The experiments' settings: one declarative table per experiment and data set.

A :class:`Setting` holds the defaults of ``lab-optax EXPERIMENT --dataset NAME``
(epochs, batch size, the model's sizes, learning rates and their schedule) and
the LAB paper's figures for it (Hou, Yao and Kwok, ICLR 2017, arXiv:1611.01600:
Tables 1, 2 and 3). The command line takes every flag that is not given from
here; :func:`paper_figures` finds the figures that belong beside a run.

Nothing here imports JAX: ``lab-optax --help`` reads these tables.
"""

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lab_optax.experiments.data.text import DEFAULT_TEXT_PATH

#: The figure each experiment reports: test error in percent, or nats per character.
METRICS: Mapping[str, str] = MappingProxyType(
  {"mlp": "test_error", "cnn": "test_error", "lstm": "test_cross_entropy"}
)


@dataclasses.dataclass(frozen=True)
class StepSchedule:
  """The learning rate times ``factor`` after each boundary, a fraction of the run.

  The paper's MNIST and SVHN schedule, x0.1 after epochs 15 and 25 of 50, is
  ``StepSchedule((0.3, 0.5), 0.1)``: stretched to any number of epochs.
  """

  boundaries: tuple[float, ...]
  factor: float

  def make(self, lr: float, epochs: int):
    """The schedule for ``epochs`` epochs: ``steps_per_epoch -> optax schedule``."""
    from lab_optax.experiments import train

    return train.step_schedule(lr, self.boundaries, self.factor, epochs)


@dataclasses.dataclass(frozen=True)
class ExponentialSchedule:
  """The learning rate times ``factor`` every ``every`` of the run, from ``start`` of it.

  CIFAR-10's x0.5 every 15 of 200 epochs, and the LSTM's x0.98 per epoch after
  epoch 10 of 200, in fractions of the run.
  """

  every: float
  factor: float
  start: float = 0.0

  def make(self, lr: float, epochs: int):
    """The schedule for ``epochs`` epochs: ``steps_per_epoch -> optax schedule``."""
    from lab_optax.experiments import train

    return train.exponential_schedule(lr, self.every, self.factor, self.start, epochs)


def _plain(value: Any) -> Any:
  """``value`` as it reads back from results.json: tuples become lists."""
  return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class PaperFigures:
  """The paper's figures per method, for runs whose config holds the values of ``when``.

  Training settings (epochs, batch size, learning rate) may differ from the
  paper's; the figure then is the paper's target, not a prediction for the run.
  """

  source: str  # Where in the paper: "Table 1", ...
  when: Mapping[str, Any]  # Config entries a run must have (its data set and architecture).
  figures: Mapping[str, float]  # Method name -> test error (%) or nats per character.

  def matches(self, config: Mapping[str, Any]) -> bool:
    return all(_plain(config.get(k)) == _plain(v) for k, v in self.when.items())


def _empty() -> Any:
  return dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclasses.dataclass(frozen=True)
class Setting:
  """The defaults of one experiment on one data set, and the paper's figures for it."""

  experiment: str  # "mlp", "cnn" or "lstm".
  dataset: str  # The --dataset name; "text" for the LSTM, whose corpus is --text.
  epochs: int
  batch_size: int
  lr: float  # The initial learning rate of every method ...
  schedule: StepSchedule | ExponentialSchedule
  sizes: Mapping[str, int]  # The model's size flags and their defaults (--hidden, ...).
  method_lr: Mapping[str, float] = _empty()  # ... but these (the MLP's LAB2).
  grad_clip: float | None = None  # Elementwise gradient clipping.
  split: tuple[float, float, float] | None = None  # The text's train/val/test fractions.
  paper: tuple[PaperFigures, ...] = ()
  # The paper's own training setting where the defaults differ from it (for the help).
  paper_setting: Mapping[str, Any] = _empty()

  def learning_rate(self, method: str, lr: float | None = None) -> float:
    """The initial learning rate of ``method``; ``lr`` (the --lr flag) sets every method's."""
    return lr if lr is not None else self.method_lr.get(method, self.lr)

  def learning_rates(self, lr: float | None = None) -> dict[str, float]:
    """The config's record of the learning rates: ``lr``, and ``lr_NAME`` per own rate."""
    rates = {"lr": self.lr if lr is None else lr}
    rates.update({f"lr_{name}": self.learning_rate(name, lr) for name in self.method_lr})
    return rates


_TABLE_1 = "Table 1"
# Table 2: SVHN by the first block's filters K (FP, BinaryConnect, BWN and LAB only).
_SVHN_BY_WIDTH = {
  16: {"fp": 2.738, "bc": 3.200, "bwn": 3.269, "lab": 3.050},
  32: {"fp": 2.585, "bc": 2.777, "bwn": 2.819, "lab": 2.742},
  128: {"fp": 2.146, "bc": 2.315, "bwn": 2.331, "lab": 2.200},
}
# The paper's schedule for MNIST and SVHN: x0.1 after epochs 15 and 25 of 50.
_STEPS = StepSchedule((0.3, 0.5), 0.1)


def _figures(source: str, when: Mapping[str, Any], figures: Mapping[str, float]) -> PaperFigures:
  return PaperFigures(source, MappingProxyType(dict(when)), MappingProxyType(dict(figures)))


def _setting(**kwargs: Any) -> Setting:
  for key in ("sizes", "method_lr", "paper_setting"):
    if key in kwargs:
      kwargs[key] = MappingProxyType(dict(kwargs[key]))
  return Setting(**kwargs)


_MLP = {"batch_size": 100, "lr": 0.01, "method_lr": {"lab2": 0.005}, "schedule": _STEPS}
_CNN = {"batch_size": 50}

SETTINGS: Mapping[tuple[str, str], Setting] = MappingProxyType(
  {
    (s.experiment, s.dataset): s
    for s in (
      # Table 1's MLP: 784FC-2048FC-2048FC-2048FC-10, batch 100, lr 0.01 (LAB2 0.005).
      _setting(experiment="mlp", dataset="digits", epochs=30, sizes={"hidden": 256}, **_MLP),
      _setting(
        experiment="mlp", dataset="mnist", epochs=50, sizes={"hidden": 2048}, **_MLP,
        paper=(
          _figures(_TABLE_1, {"hidden": 2048}, {
            "fp": 1.190, "bc": 1.280, "bwn": 1.200, "lab": 1.170, "bnn": 1.470, "xnor": 1.450,
            "lab2": 1.380,
          }),
        ),
      ),
      # The VGG-like net of Tables 1 and 2: K filters in the first block, fc units.
      _setting(
        experiment="cnn", dataset="digits", epochs=20, lr=0.01, schedule=_STEPS,
        sizes={"width": 16, "fc": 128}, **_CNN,
      ),
      _setting(
        experiment="cnn", dataset="cifar10", epochs=200, lr=0.03,
        schedule=ExponentialSchedule(15 / 200, 0.5), sizes={"width": 128, "fc": 1024}, **_CNN,
        paper=(
          _figures(_TABLE_1, {"width": 128, "fc": 1024}, {
            "fp": 11.900, "bc": 9.860, "bwn": 11.030, "lab": 10.500, "bnn": 12.870,
            "xnor": 12.370, "lab2": 12.280,
          }),
        ),
      ),
      _setting(
        experiment="cnn", dataset="svhn", epochs=50, lr=0.001, schedule=_STEPS,
        sizes={"width": 64, "fc": 1024}, **_CNN,
        paper=(
          _figures(_TABLE_1, {"width": 64, "fc": 1024}, {
            "fp": 2.277, "bc": 2.450, "bwn": 2.531, "lab": 2.354, "bnn": 3.500, "xnor": 3.580,
            "lab2": 3.362,
          }),
          *(
            _figures("Table 2", {"width": width, "fc": 1024}, figures)
            for width, figures in _SVHN_BY_WIDTH.items()
          ),
        ),
      ),
      # The character LSTM of Tables 3 and 4; the paper: hidden 512, batch 100, 200 epochs.
      _setting(
        experiment="lstm", dataset="text", epochs=2, batch_size=50, lr=2e-3,
        schedule=ExponentialSchedule(1 / 200, 0.98, 10 / 200), grad_clip=5.0,
        sizes={"hidden": 128, "timesteps": 100}, split=(0.9, 0.05, 0.05),
        paper_setting={"epochs": 200, "batch_size": 100, "hidden": 512, "timesteps": 100},
        paper=(
          _figures("Table 3", {
            "text": DEFAULT_TEXT_PATH, "hidden": 512, "timesteps": 100, "split": (0.9, 0.05, 0.05),
          }, {
            "fp": 1.329, "bc": 3.532, "bwn": 1.327, "lab": 1.314, "bnn": 3.624, "xnor": 1.426,
            "lab2": 1.412,
          }),
        ),
      ),
    )
  }
)  # fmt: skip


def datasets(experiment: str) -> tuple[str, ...]:
  """The data sets of ``experiment``, in the table's order."""
  return tuple(dataset for kind, dataset in SETTINGS if kind == experiment)


def setting_of(config: Mapping[str, Any]) -> Setting:
  """The setting of a run from its config (results.json's): its experiment and data set."""
  return SETTINGS[(config["experiment"], config.get("dataset", "text"))]


def paper_figures(config: Mapping[str, Any]) -> Mapping[str, float] | None:
  """The paper's figures for a run of its data set and architecture, else ``None``.

  MLP: MNIST with 2048 hidden units (Table 1). VGG: CIFAR-10 with K = 128
  (Table 1), SVHN with K = 64 (Table 1, all seven methods) or K = 16, 32, 128
  (Table 2: FP, BinaryConnect, BWN and LAB), both with 1024-unit dense layers.
  LSTM: the default Linux text with 512 units, 100 timesteps and the 90/5/5
  split (Table 3).

  Args:
    config: a run's config, as in results.json (``experiment``, ``dataset``
      or ``text``, and the sizes).

  Examples:
    >>> paper_figures({"experiment": "mlp", "dataset": "mnist", "hidden": 2048})["lab"]
    1.17
    >>> paper_figures({"experiment": "mlp", "dataset": "digits", "hidden": 2048}) is None
    True
  """
  key = (config.get("experiment"), config.get("dataset", "text"))
  setting = SETTINGS.get(key)
  if setting is None:
    return None
  return next((p.figures for p in setting.paper if p.matches(config)), None)

"""Training loops of the paper's experiments: one run per (method, seed), selected on validation.

A run trains for a number of epochs, evaluates validation and test after each
one, and reports the test figure at the best-validation epoch, as the paper
does. Steps are jitted on the pure state of ``(model, optimizer)`` (the Flax
NNX functional pattern), batches are sharded over the devices given
(data-parallel, JAX's own sharding), and an optional orbax checkpoint is
written after every epoch so that a run can be resumed.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lab_optax.experiments import data as data_lib
from lab_optax.experiments.models import Method, squared_hinge
from lab_optax.nnx import binarize_model

Batch = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between the classification and the language-model experiments."""

  metric: str  # Name of the reported figure: "test_error" or "test_cross_entropy".
  make_model: Callable[[Method, nnx.Rngs], nnx.Module]
  loss: Callable[[jax.Array, Batch], jax.Array]  # (outputs, batch) -> mean training loss.
  # (outputs, batch) -> (sum of the figure, number of items); the figure is the mean of those.
  evaluate: Callable[[jax.Array, Batch], tuple[jax.Array, jax.Array]]
  train_batches: Callable[[np.random.Generator], Iterator[Batch]]  # One epoch, shuffled.
  val_batches: Sequence[Batch]  # Fixed-shape evaluation batches.
  test_batches: Sequence[Batch]
  steps_per_epoch: int
  learning_rate: Callable[[int], optax.ScalarOrSchedule]  # steps_per_epoch -> schedule
  grad_clip: float | None = None
  scale: float = 1.0  # The reported figure is scale * mean (100 for errors in percent).


def classification_task(
  dataset: data_lib.ImageDataset,
  make_model: Callable[[Method, nnx.Rngs], nnx.Module],
  *,
  batch_size: int,
  learning_rate: Callable[[int], optax.ScalarOrSchedule],
) -> Task:
  """Squared hinge loss, test error in percent."""

  def loss(outputs, batch):
    return squared_hinge(outputs, batch[1])

  def evaluate(outputs, batch):
    _, labels, weight = batch
    wrong = (jnp.argmax(outputs, -1) != labels).astype(jnp.float32)
    return jnp.sum(wrong * weight), jnp.sum(weight)

  def train_batches(rng):
    x, y = dataset.train
    return data_lib.iterate_batches(x, y, batch_size, rng, drop_remainder=True)

  return Task(
    metric="test_error",
    make_model=make_model,
    loss=loss,
    evaluate=evaluate,
    train_batches=train_batches,
    val_batches=padded_batches(*dataset.val, batch_size),
    test_batches=padded_batches(*dataset.test, batch_size),
    steps_per_epoch=len(dataset.train.labels) // batch_size,
    learning_rate=learning_rate,
    scale=100.0,
  )


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[Batch]:
  """Evaluation batches of one fixed shape: the last is padded, with weight 0 on the padding."""
  out = []
  for start in range(0, len(labels), batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    weight = np.ones(batch_size, np.float32)
    if len(y) < batch_size:
      pad = batch_size - len(y)
      weight[len(y) :] = 0.0
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    out.append((x, y, weight))
  return out


def language_model_task(
  corpus: data_lib.CharCorpus,
  make_model: Callable[[Method, nnx.Rngs], nnx.Module],
  *,
  batch_size: int,
  timesteps: int,
  learning_rate: Callable[[int], optax.ScalarOrSchedule],
  grad_clip: float | None,
) -> Task:
  """Next-character cross-entropy; the figure is test cross-entropy per character in nats."""

  def loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  def evaluate(logits, batch):
    _, targets, mask = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask), jnp.sum(mask)

  # Fails early, with the split's name, when a split is too short for one batch.
  num_windows = (len(corpus.train) - 1) // timesteps
  next(data_lib.char_batches(corpus.train, batch_size, timesteps, split="train"))
  for ids, name in ((corpus.val, "validation"), (corpus.test, "test")):
    next(data_lib.char_batches(ids, batch_size, timesteps, split=name))

  def as_float_mask(batches):
    return [(x, y, m.astype(np.float32)) for x, y, m in batches]

  return Task(
    metric="test_cross_entropy",
    make_model=make_model,
    loss=loss,
    evaluate=evaluate,
    train_batches=lambda rng: data_lib.char_batches(corpus.train, batch_size, timesteps, rng),
    val_batches=as_float_mask(data_lib.char_eval_batches(corpus.val, batch_size, timesteps)),
    test_batches=as_float_mask(
      data_lib.char_eval_batches(corpus.test, batch_size, timesteps, split="test")
    ),
    steps_per_epoch=num_windows // batch_size,
    learning_rate=learning_rate,
    grad_clip=grad_clip,
  )


def step_schedule(base: float, boundaries: Sequence[float], factor: float, epochs: int):
  """``base``, times ``factor`` after each boundary; boundaries are fractions of the run.

  The paper's MNIST and SVHN schedule (x0.1 after epochs 15 and 25 of 50) is
  ``step_schedule(lr, (0.3, 0.5), 0.1, epochs)``: stretched to ``epochs``.
  """

  def make(steps_per_epoch: int) -> optax.Schedule:
    marks = {max(1, round(b * epochs)) * steps_per_epoch: factor for b in boundaries}
    return optax.piecewise_constant_schedule(base, marks)

  return make


def exponential_schedule(base: float, every: float, factor: float, start: float, epochs: int):
  """``base * factor ** k`` after ``k`` periods of ``every * epochs`` epochs, from ``start * epochs``.

  CIFAR-10 (x0.5 every 15 of 200 epochs) and the LSTM (x0.98 per epoch after
  epoch 10 of 200) in fractions of the run, stretched to ``epochs``.
  """

  def make(steps_per_epoch: int) -> optax.Schedule:
    period = max(1, round(every * epochs)) * steps_per_epoch
    return optax.exponential_decay(
      base,
      transition_steps=period,
      decay_rate=factor,
      transition_begin=round(start * epochs) * steps_per_epoch,
      staircase=True,
    )

  return make


@dataclasses.dataclass
class RunResult:
  """One (method, seed) run. ``record()`` is its entry in results.json."""

  method: Method
  seed: int
  metric: str
  val_curve: list[float]
  test_curve: list[float]
  train_loss_curve: list[float]
  wall_time_s: float
  # The model's pure state after the last epoch (not in the record): what --export packs.
  model_state: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def best_epoch(self) -> int:
    """1-based epoch with the lowest validation figure (the first one on ties; NaN never wins)."""
    val = np.asarray(self.val_curve, np.float64)
    return int(np.nanargmin(val)) + 1 if np.isfinite(val).any() else 1

  def record(self) -> dict[str, Any]:
    best = self.best_epoch - 1
    val_name = self.metric.replace("test_", "val_")
    return {
      "method": self.method.name,
      "label": self.method.label,
      "seed": self.seed,
      self.metric: self.test_curve[best],
      val_name: self.val_curve[best],
      "best_epoch": self.best_epoch,
      "epochs": len(self.val_curve),
      "val_curve": self.val_curve,
      "test_curve": self.test_curve,
      "train_loss_curve": self.train_loss_curve,
      "wall_time_s": self.wall_time_s,
    }


def make_mesh(devices: int | None) -> Mesh:
  """A 1-D ``data`` mesh over the first ``devices`` devices (all when ``None``)."""
  available = jax.devices()
  n = len(available) if devices is None else devices
  if not 1 <= n <= len(available):
    raise ValueError(f"--devices {n}: this machine has {len(available)} device(s)")
  return Mesh(np.array(available[:n]), ("data",))


class _Checkpoints:
  """An orbax CheckpointManager for one run: the train state and the curves, every epoch.

  Orbax writes each step to a temporary directory and renames it when complete,
  so a crash mid-save leaves no step that restores wrong.
  """

  def __init__(self, directory: Path):
    self.manager = ocp.CheckpointManager(
      directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    )

  def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)), meta=ocp.args.JsonSave(meta)
      ),
    )
    self.manager.wait_until_finished()

  def restore(self, state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    restored = self.manager.restore(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    nnx.replace_by_pure_dict(state, restored.state)
    return epoch, state, restored.meta


def initial_state(task: Task, method: Method, seed: int, mesh: Mesh) -> tuple[Any, Any, Any]:
  """A run before its first step: ``(graphdef, eval_graphdef, state)``.

  ``state`` is the pure state of ``(model, optimizer)``, replicated over ``mesh``, with binarized
  kernels on their first projection. ``graphdef`` merges ``state`` back into both, the model in
  training mode; ``eval_graphdef`` merges ``state[0]`` into the model in evaluation mode.
  """
  model = task.make_model(method, nnx.Rngs(seed))
  schedule = task.learning_rate(task.steps_per_epoch)
  optimizer = nnx.Optimizer(
    model, method.make_optimizer(schedule, model, task.grad_clip), wrt=nnx.Param
  )
  if method.optimizer is not None:
    binarize_model(model, optimizer)  # the t = 1 projection
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return graphdef, eval_graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
  """A batch split along its first axis over the mesh's ``data`` axis (data-parallel)."""
  return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))


# Module-level and keyed on (graphdef, loss): the runs of one method share one
# compilation across seeds.
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _train_step(graphdef, loss_fn, state, batch):
  model, optimizer = nnx.merge(graphdef, state)
  loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(batch[0]), batch))(model)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), loss


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef, evaluate_fn, model_state, batch):
  model = nnx.merge(graphdef, model_state)
  return evaluate_fn(model(batch[0]), batch)


def evaluate(
  task: Task, graphdef: Any, model_state: Any, batches: Sequence[Batch], mesh: Mesh
) -> float:
  """The task's figure (test error in percent, or cross-entropy) of a model over ``batches``."""
  total = count = 0.0
  for batch in batches:
    s, n = _eval_step(graphdef, task.evaluate, model_state, shard_batch(batch, mesh))
    total, count = total + float(s), count + float(n)
  return task.scale * total / max(count, 1.0)


def run(
  task: Task,
  method: Method,
  seed: int,
  *,
  epochs: int,
  mesh: Mesh,
  checkpoint_dir: Path | None = None,
  resume: bool = False,
  progress: Callable[..., Any] | None = None,
) -> RunResult:
  """Trains one model with one method and seed; see the module docstring."""
  graphdef, eval_graphdef, state = initial_state(task, method, seed, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())

  curves: dict[str, list[float]] = {"val": [], "test": [], "train_loss": []}
  wall, start_epoch = 0.0, 0
  checkpoints = _Checkpoints(checkpoint_dir) if checkpoint_dir is not None else None
  if checkpoints is not None and resume:
    restored = checkpoints.restore(state)
    if restored is not None:
      start_epoch, state, meta = restored
      state = jax.device_put(state, replicated)
      curves, wall = meta["curves"], meta["wall_time_s"]
      if curves["train_loss"] and not math.isfinite(curves["train_loss"][-1]):
        start_epoch = epochs  # it had diverged and stopped: resuming does not train on NaN

  bar = None
  if progress is not None:
    bar = progress(
      total=epochs * task.steps_per_epoch,
      initial=start_epoch * task.steps_per_epoch,
      desc=f"{method.label} seed {seed}",
      unit="step",
    )
  for epoch in range(start_epoch, epochs):
    began = time.perf_counter()
    # One generator per (seed, epoch): a resumed run shuffles exactly as an uninterrupted one.
    rng = np.random.default_rng([seed, epoch])
    losses = []
    for i, batch in enumerate(task.train_batches(rng)):
      state, loss = _train_step(graphdef, task.loss, state, shard_batch(batch, mesh))
      losses.append(loss)
      if bar is not None:
        bar.update(1)
        if i % 50 == 0:
          bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    curves["train_loss"].append(float(np.mean(jax.device_get(losses))))
    curves["val"].append(evaluate(task, eval_graphdef, state[0], task.val_batches, mesh))
    curves["test"].append(evaluate(task, eval_graphdef, state[0], task.test_batches, mesh))
    wall += time.perf_counter() - began
    if bar is not None:
      name = "val_err%" if task.metric == "test_error" else "val_ce"
      bar.set_postfix({"loss": f"{curves['train_loss'][-1]:.4f}", name: f"{curves['val'][-1]:.3f}"})
    if checkpoints is not None:
      checkpoints.save(epoch + 1, state, {"curves": curves, "wall_time_s": wall})
    if not math.isfinite(curves["train_loss"][-1]):
      break  # a diverged run: keep its curves, stop spending time on it
  if bar is not None:
    bar.close()
  return RunResult(
    method=method,
    seed=seed,
    metric=task.metric,
    val_curve=curves["val"],
    test_curve=curves["test"],
    train_loss_curve=curves["train_loss"],
    wall_time_s=wall,
    model_state=state[0],
  )

"""``--export DIR``: each trained run's deployable low-bit model, and its test figure from the file.

After a run, its final model (the weights of the last epoch) is put in
evaluation mode, its batch norms are folded into the layers before them where
the model can (the MLP), its quantized kernels are packed
(:func:`lab_optax.nnx.pack_model`: 1 bit per binary weight, 2 per ternary one,
m per m-bit one) and the state is written to ``DIR/METHOD-seedSEED.npz`` with
:func:`lab_optax.save_packed`. A freshly built model of the same method then
loads that file and is evaluated on the test set: that figure, beside the
float model's at the same (last) epoch, goes into the run's record under
``"export"``. Full-precision runs (``fp``) have nothing to pack and are not
exported.
"""

import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import lab_optax
from lab_optax.experiments import train


def export_run(
  task: train.Task, result: train.RunResult, directory: Path, mesh: Any
) -> dict[str, Any] | None:
  """Packs ``result``'s final model into ``directory``; ``None`` for a full-precision method.

  Returns:
    ``{"file", "bytes", "float32_bytes", "bits_per_weight", "<metric>_float",
    "<metric>_packed"}``: the file's name and size, the size of the model's
    parameters in float32, the mean bits per packed weight, and the test figure
    of the float model (last epoch) and of a fresh model loaded from the file.
  """
  method = result.method
  if method.optimizer is None:
    return None
  model = _model(task, result)
  nnx.update(model, result.model_state)
  float32_bytes = 4 * sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  _fold(model)
  lab_optax.nnx.pack_model(model)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"{method.name}-seed{result.seed}.npz"
  lab_optax.save_packed(path, nnx.state(model, nnx.Not(nnx.RngState)))

  fresh = _fold(_model(task, result))
  nnx.update(fresh, lab_optax.load_packed(path))
  graphdef, state = nnx.split(fresh)
  packed = [leaf for leaf in jax.tree.leaves(state, is_leaf=_is_packed) if _is_packed(leaf)]
  weights = sum(math.prod(leaf.shape) for leaf in packed)
  bits = sum(leaf.bits_per_weight * math.prod(leaf.shape) for leaf in packed)
  return {
    "file": path.name,
    "bytes": os.path.getsize(path),
    "float32_bytes": int(float32_bytes),
    "bits_per_weight": bits / weights if weights else None,
    f"{result.metric}_float": result.test_curve[-1],
    f"{result.metric}_packed": train.evaluate(task, graphdef, state, task.test_batches, mesh),
  }


def _is_packed(leaf: Any) -> bool:
  return isinstance(leaf, lab_optax.PackedBinary | lab_optax.PackedQuantized)


def _model(task: train.Task, result: train.RunResult) -> nnx.Module:
  """A fresh model of ``result``'s method and seed, in evaluation mode."""
  model = task.make_model(result.method, nnx.Rngs(result.seed))
  model.eval()
  return model


def _fold(model: nnx.Module) -> nnx.Module:
  """Folds the batch norms of models that can (the MLP); others keep theirs."""
  if hasattr(model, "fold_batch_norm"):
    model.fold_batch_norm()
  return model

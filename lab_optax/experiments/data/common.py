"""What the image and text loaders share: :class:`DataError`, file helpers, and the one check
that a split holds at least one batch (:func:`check_batch_fits`)."""

import os
from collections.abc import Mapping
from pathlib import Path

_PathLike = str | os.PathLike


class DataError(Exception):
  """Bad data or data arguments; the message is one line naming the culprit and the fix."""


def _check_dir(data_dir: _PathLike, what: str, hint: str) -> Path:
  path = Path(data_dir)
  if not path.exists():
    raise DataError(f"{what} data directory {path} does not exist: create it and {hint}")
  if not path.is_dir():
    raise DataError(f"{what} data directory {path} is not a directory: {hint}")
  return path


def _unreadable(path: Path, error: OSError) -> DataError:
  return DataError(
    f"cannot read {path}: {error.strerror or error}; check that it is a readable file"
  )


def _read_bytes(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise _unreadable(path, e) from e


def check_batch_fits(
  lengths: Mapping[str, int], needed: int, *, source: str, batch: str, unit: str, fix: str
) -> None:
  """Raises :class:`DataError` when a split is shorter than one training batch.

  The one check of "split too short" for images and text alike, made before
  anything is trained or written: training drops the last partial batch, so
  each split named in ``lengths`` needs one whole batch.

  Args:
    lengths: the length of each split to check, by name (``"training"``, ...).
    needed: the length one batch needs (examples, or characters).
    source: what was split (a data set's name, a text's path), for the message.
    batch: how the batch size was chosen (``"--batch-size 100"``), for the message.
    unit: what ``lengths`` counts (``"examples"``, ``"characters"``).
    fix: what the user can do.

  Raises:
    DataError: naming the first split that is too short.

  Examples:
    >>> check_batch_fits({"training": 10}, 8, source="x", batch="8", unit="examples", fix="")
    >>> check_batch_fits(
    ...   {"training": 10, "test": 4}, 8, source="x", batch="--batch-size 8", unit="examples",
    ...   fix="lower --batch-size")
    Traceback (most recent call last):
    ...
    lab_optax.experiments.data.common.DataError: --batch-size 8 is larger than the 4 test examples of x (one batch needs 8): lower --batch-size
  """
  for name, length in lengths.items():
    if length < needed:
      raise DataError(
        f"{batch} is larger than the {length} {name} {unit} of {source} (one batch needs "
        f"{needed}): {fix}"
      )

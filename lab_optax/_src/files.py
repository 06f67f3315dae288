"""Files written whole or not at all: :func:`write_atomic`."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
  """The process's umask (read by setting it, then put back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
  """Writes a file through a temporary file in the same directory, then renames it into place.

  A reader sees the old file or the new one, never a part of it, and a failure
  (an exception in ``write``, a full disk) leaves the old file as it was and no
  temporary behind. The parent directory is created if needed. The file gets
  the mode a plain ``open(path, "w")`` would give it (0o666 less the umask),
  not the 0o600 of ``tempfile.mkstemp``.

  Args:
    path: the file to write.
    write: called once with the temporary file, opened for writing in binary
      mode; its return value is ignored.

  Example usage::

    >>> import json, pathlib, tempfile
    >>> from lab_optax._src.files import write_atomic
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "out" / "results.json"
    >>> write_atomic(path, lambda f: f.write(json.dumps({"a": 1}).encode()))
    >>> path.read_text()
    '{"a": 1}'
  """
  path = Path(path)
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

"""Character-level text for the LSTM experiments: loading a corpus, splitting it, batching it."""

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lab_optax.experiments.data.common import DataError, _PathLike, _read_bytes

DEFAULT_TEXT_PATH = "/usr/include/linux"
"""The Linux kernel's UAPI headers (Debian's linux-libc-dev): ~760 files, ~4.7M characters."""

_UTF8_BOM = b"\xef\xbb\xbf"


class CharCorpus(NamedTuple):
  """A character-level corpus: a vocabulary and three contiguous splits of character ids."""

  chars: str  # The vocabulary: sorted unique characters; id i stands for chars[i].
  train: np.ndarray  # (n_train,) int32 ids.
  val: np.ndarray  # (n_val,) int32 ids.
  test: np.ndarray  # (n_test,) int32 ids.

  @property
  def vocab_size(self) -> int:
    """Number of distinct characters."""
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Maps ``text`` to an ``int32`` array of ids.

    Raises:
      DataError: if ``text`` holds a character outside the vocabulary.
    """
    codes = _code_points(text)
    vocab = _code_points(self.chars)
    ids = np.searchsorted(vocab, codes).astype(np.int32)
    unknown = (ids >= len(vocab)) | (vocab[np.minimum(ids, len(vocab) - 1)] != codes)
    if unknown.any():
      char = text[int(np.argmax(unknown))]
      raise DataError(
        f"character {char!r} is not in the corpus vocabulary: remove it from the text"
      )
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Maps ids back to a string."""
    return "".join(self.chars[i] for i in np.asarray(ids).ravel())

  def __repr__(self) -> str:
    return (
      f"CharCorpus(vocab_size={self.vocab_size}, train={len(self.train)}, "
      f"val={len(self.val)}, test={len(self.test)})"
    )


def _code_points(text: str) -> np.ndarray:
  # UTF-32 gives one fixed-width unit per character, so numpy handles millions at once.
  return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def load_text(path: _PathLike = DEFAULT_TEXT_PATH) -> str:
  """Reads a text corpus from a file or, recursively, from a directory.

  A file is decoded as UTF-8 (a byte-order mark dropped, undecodable bytes
  replaced by U+FFFD). In a directory, files are read in the order of their
  paths relative to ``path``, sorted component by component (so the result
  does not depend on the file system: ``a/b/c`` before ``a/z`` before ``b``); hidden
  files and directories (names starting with ".") and symbolic links to
  directories are skipped, and so is every file that is not valid UTF-8 or
  holds a NUL byte (binaries, other encodings); each file's text is followed by
  a newline if it does not end with one. Line endings are kept as they are.

  Args:
    path: a text file or a directory; by default :data:`DEFAULT_TEXT_PATH`.

  Returns:
    The text.

  Raises:
    DataError: ``path`` missing or unreadable, a binary file, or no text found.
  """
  root = Path(path)
  if not root.exists():
    raise DataError(f"text path {root} does not exist: give a text file or a directory of them")
  if not root.is_dir():
    data = _read_bytes(root)
    if b"\0" in data:
      raise DataError(f"{root} looks binary (it holds NUL bytes): give a text file")
    text = data.removeprefix(_UTF8_BOM).decode("utf-8", errors="replace")
  else:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      files += [Path(dirpath, name) for name in filenames if not name.startswith(".")]
    # Sorting by path components puts "a/b/c" before "a/z" before "b", whatever the walk order.
    files.sort(key=lambda file: file.relative_to(root).parts)
    pieces = []
    for file in files:
      if not file.is_file():  # A broken link, a socket, ...
        continue
      data = _read_bytes(file)
      if b"\0" in data:  # Binary; UTF-8 text never holds NUL.
        continue
      try:
        piece = data.removeprefix(_UTF8_BOM).decode("utf-8")
      except UnicodeDecodeError:  # Binary or another encoding.
        continue
      pieces.append(piece if piece.endswith("\n") or not piece else piece + "\n")
    text = "".join(pieces)
  if not text:
    raise DataError(f"{root}: no UTF-8 text found; give a non-empty text file or directory")
  return text


def make_char_dataset(text: str, split: Sequence[float] = (0.9, 0.05, 0.05)) -> CharCorpus:
  """Builds the vocabulary and the contiguous train/validation/test split of a text.

  The vocabulary holds every character of the whole text, so each split can be
  encoded. The text is cut in three contiguous pieces in order: the first
  ``int(n * split[0])`` characters train, the next ``int(n * split[1])``
  validate, the rest test. The paper uses 90/5/5 for Linux and 80/10/10 for
  War and Peace.

  Args:
    text: the corpus, e.g. from :func:`load_text`.
    split: three positive fractions summing to 1.

  Returns:
    A :class:`CharCorpus`.

  Raises:
    DataError: a bad ``split``, or a text so short that a split gets fewer than
      2 characters (one input and its target).

  Examples:
    >>> corpus = make_char_dataset("abracadabra" * 20, split=(0.8, 0.1, 0.1))
    >>> corpus
    CharCorpus(vocab_size=5, train=176, val=22, test=22)
    >>> corpus.chars, corpus.decode(corpus.train[:4])
    ('abcdr', 'abra')
  """
  split = tuple(float(f) for f in split)
  if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1.0) > 1e-6:
    raise DataError(
      f"split must be three positive fractions (train, val, test) summing to 1, got {split}"
    )
  codes = _code_points(text)
  vocab, ids = np.unique(codes, return_inverse=True)
  ids = ids.astype(np.int32)
  chars = "".join(map(chr, vocab))
  n = len(ids)
  n_train, n_val = int(n * split[0]), int(n * split[1])
  bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
  for name, (start, stop) in bounds.items():
    if stop - start < 2:
      raise DataError(
        f"text of {n} characters is too short: its {name} split gets {stop - start} "
        "character(s), at least 2 are needed; use a longer text"
      )
  return CharCorpus(chars, *(ids[start:stop] for start, stop in bounds.values()))


def _check_char_args(batch_size: int, timesteps: int) -> None:
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1, got {batch_size}")
  if timesteps < 1:
    raise DataError(f"timesteps must be >= 1, got {timesteps}")


def char_batches(
  ids: np.ndarray,
  batch_size: int,
  timesteps: int,
  rng: np.random.Generator | None = None,
  *,
  split: str = "train",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(inputs, targets)`` batches of non-overlapping character windows.

  Window ``k`` reads the ``timesteps + 1`` characters starting at
  ``k * timesteps``: its first ``timesteps`` are the inputs and its last
  ``timesteps`` the next-character targets. The input windows tile the split
  without overlap, so every character after the first is a target exactly once
  per epoch (the scheme of the paper's code, after Karpathy's char-rnn). There
  are ``(len(ids) - 1) // timesteps`` windows; with ``rng`` they are shuffled
  (call once per epoch), and they are grouped in batches of ``batch_size``,
  dropping the windows that do not fill a batch. For an evaluation that covers
  every character, use :func:`char_eval_batches`.

  Args:
    ids: ``(n,)`` character ids of one split.
    batch_size: windows per batch.
    timesteps: characters per window (the unrolled length).
    rng: shuffles the windows when given; the original order when ``None``.
    split: name of the split, for error messages.

  Yields:
    ``inputs, targets``: ``(batch_size, timesteps)`` int32 arrays with
    ``targets[:, t] == inputs[:, t + 1]`` for ``t < timesteps - 1``.

  Raises:
    DataError: the split is shorter than one batch (``batch_size * timesteps + 1``
      characters), or ``batch_size`` or ``timesteps`` below 1.

  Examples:
    >>> ids = np.arange(13, dtype=np.int32)
    >>> for x, y in char_batches(ids, batch_size=2, timesteps=3):
    ...   print(x.tolist(), y.tolist())
    [[0, 1, 2], [3, 4, 5]] [[1, 2, 3], [4, 5, 6]]
    [[6, 7, 8], [9, 10, 11]] [[7, 8, 9], [10, 11, 12]]
  """
  _check_char_args(batch_size, timesteps)
  ids = np.asarray(ids)
  num_windows = max(len(ids) - 1, 0) // timesteps
  num_batches = num_windows // batch_size
  if num_batches == 0:
    raise DataError(
      f"the {split} split has {len(ids)} characters, but one batch of {batch_size} windows of "
      f"{timesteps} timesteps needs {batch_size * timesteps + 1}: lower batch_size or "
      "timesteps, or use a longer text"
    )
  order = rng.permutation(num_windows) if rng is not None else np.arange(num_windows)
  offsets = np.arange(timesteps + 1)
  for b in range(num_batches):
    starts = order[b * batch_size : (b + 1) * batch_size] * timesteps
    window = ids[starts[:, None] + offsets].astype(np.int32)
    yield window[:, :-1], window[:, 1:]


def char_eval_batches(
  ids: np.ndarray, batch_size: int, timesteps: int, *, split: str = "val"
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields fixed-shape ``(inputs, targets, mask)`` batches covering a whole split, in order.

  The windows are those of :func:`char_batches` without shuffling, plus a last
  partial window, and the last batch is filled with empty windows; ``mask``
  marks the real targets, so every character after the first is predicted
  exactly once and every batch has the same shape (one compilation). The mean
  cross-entropy per character of the split is
  ``sum(loss * mask) / sum(mask)`` over all batches.

  Args:
    ids: ``(n,)`` character ids of one split, ``n >= 2``.
    batch_size: windows per batch.
    timesteps: characters per window.
    split: name of the split, for error messages.

  Yields:
    ``inputs, targets``: ``(batch_size, timesteps)`` int32 (0 where padded);
    ``mask``: ``(batch_size, timesteps)`` bool, True on real targets.

  Raises:
    DataError: fewer than 2 characters, or ``batch_size`` or ``timesteps`` below 1.

  Examples:
    >>> ids = np.arange(6, dtype=np.int32)
    >>> for x, y, m in char_eval_batches(ids, batch_size=2, timesteps=2):
    ...   print(x.tolist(), y.tolist(), m.tolist())
    [[0, 1], [2, 3]] [[1, 2], [3, 4]] [[True, True], [True, True]]
    [[4, 0], [0, 0]] [[5, 0], [0, 0]] [[True, False], [False, False]]
  """
  _check_char_args(batch_size, timesteps)
  ids = np.asarray(ids)
  num_targets = len(ids) - 1
  if num_targets < 1:
    raise DataError(
      f"the {split} split has {len(ids)} character(s), at least 2 are needed; use a longer text"
    )
  num_windows = -(-num_targets // timesteps)
  num_batches = -(-num_windows // batch_size)
  padded = np.zeros(num_batches * batch_size * timesteps + 1, np.int32)
  padded[: len(ids)] = ids
  # Target of input position p is position p + 1; it is real while p + 1 < len(ids).
  positions = np.arange(num_batches * batch_size * timesteps).reshape(-1, batch_size, timesteps)
  for b in range(num_batches):
    pos = positions[b]
    mask = pos + 1 < len(ids)
    yield np.where(mask, padded[pos], 0), np.where(mask, padded[pos + 1], 0), mask

"""Image data sets of the paper's experiments: the embedded digits, MNIST, CIFAR-10 and SVHN.

Images come out in NHWC ``float32`` scaled to ``[-1, 1]`` (``x / 127.5 - 1``
for 8-bit pixels, ``x / 8 - 1`` for the 0..16 digits), the input range of the
BinaryNet code that the paper's code builds on; labels are ``int32`` class ids.
For MNIST, CIFAR-10 and SVHN the validation set is the tail of the official
training files, as in the paper (50k/10k/10k for MNIST, 45k/5k/10k for
CIFAR-10; 6000 images for SVHN), so the splits are fixed; the digits get a
seeded stratified 60/20/20 split.
"""

import gzip
import io
import math
import pickle
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lab_optax.experiments.data.common import (
  DataError,
  _check_dir,
  _PathLike,
  _read_bytes,
  _unreadable,
)

IMAGE_DATASETS = ("digits", "mnist", "cifar10", "svhn")
"""Names accepted by :func:`load_image_dataset`."""

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.
_MNIST_FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_SUBDIR = "cifar-10-batches-py"
_SVHN_VAL_SIZE = 6000  # BinaryConnect's SVHN validation set had 6000 images.


class ImageSplit(NamedTuple):
  """One split of an image dataset; unpacks as ``images, labels = split``."""

  images: np.ndarray  # (N, H, W, C) float32 in [-1, 1].
  labels: np.ndarray  # (N,) int32 in [0, num_classes).


class ImageDataset(NamedTuple):
  """An image classification dataset with train/validation/test splits."""

  name: str  # One of IMAGE_DATASETS.
  train: ImageSplit
  val: ImageSplit
  test: ImageSplit
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    return tuple(self.train.images.shape[1:])

  def __repr__(self) -> str:
    # The default repr would print pixel arrays; the sizes are what a log needs.
    return (
      f"ImageDataset(name={self.name!r}, train={len(self.train.labels)}, "
      f"val={len(self.val.labels)}, test={len(self.test.labels)}, "
      f"input_shape={self.input_shape}, num_classes={self.num_classes})"
    )


# ---------------------------------------------------------------------------
# Helpers.


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]; in place on the float copy to halve peak memory."""
  x = pixels.astype(np.float32)
  x /= np.float32(127.5)
  x -= np.float32(1.0)
  return x


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
      f"{path}: labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]; "
      "the file is corrupted or not from this dataset"
    )
  return labels.astype(np.int32)


def _check_files(root: Path, names: Sequence[str], what: str, hint: str) -> None:
  missing = [name for name in names if not (root / name).exists()]
  if missing:
    raise DataError(f"{root}: missing {what} file(s) {', '.join(missing)}; {hint}")


def _split_off_tail(images: np.ndarray, labels: np.ndarray, n_val: int, source: str):
  """Last ``n_val`` examples -> validation, the rest -> train."""
  if n_val < 1 or n_val >= len(labels):
    raise DataError(
      f"{source}: {len(labels)} training images are too few to split off a validation set; "
      "use the complete training files"
    )
  cut = len(labels) - n_val
  return ImageSplit(images[:cut], labels[:cut]), ImageSplit(images[cut:], labels[cut:])


# ---------------------------------------------------------------------------
# Embedded digits.


def load_digits(seed: int = 0) -> ImageDataset:
  """scikit-learn's 1797 8x8 handwritten digits (shipped inside scikit-learn, no download).

  The split is stratified by class and deterministic for a given ``seed``:
  20% test (360), 20% validation (360) and the remaining 60% train (1077).
  Pixels (0..16 in the original) are scaled to ``[-1, 1]`` by ``x / 8 - 1``.
  Indices within each split are in the original order.

  Args:
    seed: seed of the split.

  Returns:
    An :class:`ImageDataset` with images of shape ``(N, 8, 8, 1)`` and 10 classes.

  Examples:
    >>> ds = load_digits()
    >>> ds
    ImageDataset(name='digits', train=1077, val=360, test=360, input_shape=(8, 8, 1), num_classes=10)
    >>> float(ds.train.images.min()), float(ds.train.images.max())
    (-1.0, 1.0)
  """
  # Imported here: scikit-learn takes about a second to import and only this loader needs it.
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split

  digits = sk_load_digits()
  images = (digits.images.astype(np.float32) / np.float32(8.0) - np.float32(1.0))[..., None]
  labels = digits.target.astype(np.int32)
  index = np.arange(len(labels))
  rest, test = train_test_split(index, test_size=0.2, stratify=labels, random_state=seed)
  # 0.25 of the remaining 80% is 20% of the whole.
  train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=seed)

  def take(idx):
    idx = np.sort(idx)
    return ImageSplit(images[idx], labels[idx])

  return ImageDataset("digits", take(train), take(val), take(test), 10)


# ---------------------------------------------------------------------------
# MNIST (IDX files).


def _find_mnist_file(data_dir: Path, name: str) -> Path | None:
  # Some mirrors write "train-images.idx3-ubyte" (a dot before idx).
  stems = (name, name.replace("-idx", ".idx"))
  for stem in stems:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
      if candidate.exists():
        return candidate
  return None


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
  """Reads an IDX file (raw or gzipped): big-endian magic, big-endian dims, uint8 data."""
  raw = _read_bytes(path)
  if path.suffix == ".gz":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: corrupted or truncated gzip ({e}); download the file again") from e
  kind = "image" if magic == _IDX_IMAGES_MAGIC else "label"
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise DataError(
      f"{path}: {len(raw)} bytes is shorter than an IDX {kind} header ({header_size} bytes); "
      "download the file again"
    )
  found = int.from_bytes(raw[:4], "big")
  if found != magic:
    raise DataError(
      f"{path}: bad IDX magic number {found} (expected {magic} for an MNIST {kind} file); "
      "is it the right file, and is a gzipped file named .gz?"
    )
  dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  expected = math.prod(dims)  # Python ints: a corrupted header cannot overflow.
  if len(raw) - header_size != expected:
    raise DataError(
      f"{path}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
      f"file holds {len(raw) - header_size}; the file is truncated or corrupted, download it again"
    )
  return np.frombuffer(raw, np.uint8, offset=header_size).reshape(dims)


def load_mnist(data_dir: _PathLike) -> ImageDataset:
  """MNIST from the four standard IDX files in ``data_dir``.

  Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or
  gzipped (``.gz``). As in the paper, the last 10000 of the 60000 training
  images are the validation set (50k/10k/10k); in general the last
  ``n_train // 6`` training images are, which is how files smaller than the
  official ones are split. Pixels are scaled to ``[-1, 1]``. The names
  ``train-images.idx3-ubyte`` (a dot before ``idx``) are accepted too; an
  uncompressed file is read in preference to its ``.gz``.

  Args:
    data_dir: directory holding the four files.

  Returns:
    An :class:`ImageDataset` with images of shape ``(N, 28, 28, 1)`` (the
    files' size) and 10 classes.

  Raises:
    DataError: missing directory or files, unreadable or corrupted files.
  """
  hint = "put the four MNIST IDX files (gzipped or not) in it"
  root = _check_dir(data_dir, "MNIST", hint)
  paths = {key: _find_mnist_file(root, name) for key, name in _MNIST_FILES.items()}
  missing = [f"{_MNIST_FILES[key]}[.gz]" for key, path in paths.items() if path is None]
  if missing:
    raise DataError(f"{root}: missing MNIST file(s) {', '.join(missing)}; {hint}")

  def read_pair(images_key, labels_key):
    images = _read_idx(paths[images_key], _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(paths[labels_key], _IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels):
      raise DataError(
        f"{paths[images_key]} holds {len(images)} images but {paths[labels_key]} holds "
        f"{len(labels)} labels; the files do not belong together"
      )
    labels = _check_labels(labels, 10, paths[labels_key])
    return _to_unit_range(images)[..., None], labels

  train_x, train_y = read_pair("train_images", "train_labels")
  test_x, test_y = read_pair("test_images", "test_labels")
  if train_x.shape[1:] != test_x.shape[1:]:
    raise DataError(
      f"{paths['train_images']} holds {train_x.shape[1:3]} images but {paths['test_images']} "
      f"holds {test_x.shape[1:3]}; the files do not belong together"
    )
  train, val = _split_off_tail(train_x, train_y, len(train_y) // 6, str(paths["train_images"]))
  return ImageDataset("mnist", train, val, ImageSplit(test_x, test_y), 10)


# ---------------------------------------------------------------------------
# CIFAR-10 (python pickle batches).


class _CifarUnpickler(pickle.Unpickler):
  """Unpickler that only builds numpy arrays: a pickle from a user's directory can run code."""

  _ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writes bytes objects at protocol 2 as _codecs.encode(str, "latin1").
    ("_codecs", "encode"),
  }

  def find_class(self, module: str, name: str) -> Any:
    # The official batches were pickled by Python 2 with numpy 1, whose module
    # numpy.core is numpy._core in numpy 2.
    if module.startswith("numpy.core"):
      module = "numpy._core" + module[len("numpy.core") :]
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  raw = _read_bytes(path)
  try:
    # encoding="bytes" keeps the Python 2 str keys as bytes (b"data", b"labels").
    batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # Any failure to unpickle means a corrupted file.
    raise DataError(
      f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); download it again"
    ) from e
  if not isinstance(batch, dict):
    raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
  # Accept str keys too, from batches re-pickled by Python 3.
  batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
  missing = [key for key in ("data", "labels") if key not in batch]
  if missing:
    raise DataError(f"{path}: the pickled dict lacks key(s) {missing}; is it a CIFAR-10 batch?")
  data, labels = batch["data"], np.asarray(batch["labels"])
  if not (
    isinstance(data, np.ndarray)
    and data.dtype == np.uint8
    and data.ndim == 2
    and data.shape[1] == 3072
  ):
    shape = getattr(data, "shape", None)
    raise DataError(
      f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {type(data).__name__} "
      f"of shape {shape}; is it a CIFAR-10 (not CIFAR-100) batch?"
    )
  if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
      f"{path}: 'labels' must be {len(data)} integers, one per image, found shape {labels.shape}"
    )
  # Rows are channel-major (1024 red, 1024 green, 1024 blue values, each row by row).
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, _check_labels(labels, 10, path)


def load_cifar10(data_dir: _PathLike) -> ImageDataset:
  """CIFAR-10 from the python pickle batches (``cifar-10-python.tar.gz``, extracted).

  ``data_dir`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``,
  directly or in the archive's ``cifar-10-batches-py`` subdirectory. Each
  batch is a pickled dict with ``b"data"`` (``(N, 3072)`` uint8, channel-major)
  and ``b"labels"``. The pickles are read with an unpickler that builds nothing
  but numpy arrays. As in the paper, the last 5000 training images are the
  validation set (45k/5k/10k); in general the last ``n_train // 10``.
  Pixels are scaled to ``[-1, 1]``.

  Args:
    data_dir: directory holding the batches or their ``cifar-10-batches-py`` directory.

  Returns:
    An :class:`ImageDataset` with images of shape ``(N, 32, 32, 3)`` and 10 classes.

  Raises:
    DataError: missing directory or files, unreadable or corrupted files.
  """
  hint = "extract cifar-10-python.tar.gz (tar xzf) into it"
  root = _check_dir(data_dir, "CIFAR-10", hint)
  if (root / _CIFAR_SUBDIR).is_dir():
    root = root / _CIFAR_SUBDIR
  _check_files(root, (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE), "CIFAR-10", hint)
  parts = [_read_cifar_batch(root / name) for name in _CIFAR_TRAIN_FILES]
  train_x = _to_unit_range(np.concatenate([x for x, _ in parts]))
  train_y = np.concatenate([y for _, y in parts])
  test_x, test_y = _read_cifar_batch(root / _CIFAR_TEST_FILE)
  train, val = _split_off_tail(train_x, train_y, len(train_y) // 10, str(root / "data_batch_*"))
  return ImageDataset("cifar10", train, val, ImageSplit(_to_unit_range(test_x), test_y), 10)


# ---------------------------------------------------------------------------
# SVHN (cropped digits, .mat files).


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
  # Imported here: only this loader needs scipy.io.
  import scipy.io

  # Opened apart from parsing so that an unreadable file and a corrupted one get different messages.
  try:
    file = open(path, "rb")
  except OSError as e:
    raise _unreadable(path, e) from e
  try:
    with file:
      mat = scipy.io.loadmat(file, variable_names=("X", "y"))
  except Exception as e:  # scipy raises many exception types for a corrupted file.
    raise DataError(
      f"{path}: not a readable MATLAB file ({type(e).__name__}: {e}); download it again"
    ) from e
  missing = [key for key in ("X", "y") if key not in mat]
  if missing:
    raise DataError(
      f"{path}: the .mat file lacks variable(s) {missing}; is it an SVHN *_32x32.mat?"
    )
  x, y = mat["X"], mat["y"]
  if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
    raise DataError(
      f"{path}: 'X' must be uint8 of shape (32, 32, 3, N), found {x.dtype} {x.shape}; "
      "is it an SVHN cropped-digits (format 2) file?"
    )
  if y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
    raise DataError(
      f"{path}: 'y' must hold {x.shape[3]} labels, one per image, found {y.dtype} {y.shape}"
    )
  labels = y.reshape(-1).astype(np.int64)
  if labels.size and (labels.min() < 1 or labels.max() > 10):
    raise DataError(
      f"{path}: SVHN labels must lie in [1, 10], found [{labels.min()}, {labels.max()}]; "
      "the file is corrupted"
    )
  labels[labels == 10] = 0  # SVHN writes digit 0 as label 10.
  # (H, W, C, N) -> (N, H, W, C).
  return np.transpose(x, (3, 0, 1, 2)), labels.astype(np.int32)


def load_svhn(data_dir: _PathLike, *, use_extra: bool = False) -> ImageDataset:
  """SVHN cropped digits from ``train_32x32.mat`` and ``test_32x32.mat`` in ``data_dir``.

  Each file holds ``X`` (``(32, 32, 3, N)`` uint8) and ``y`` (``(N, 1)``, with
  label 10 for the digit 0, mapped to 0 here). The validation set is the last
  ``min(6000, n_train // 10)`` images of ``train_32x32.mat`` (6000 of 73257,
  the size of BinaryConnect's SVHN validation set). With ``use_extra``, the
  531131 images of ``extra_32x32.mat`` are appended to the training split, as
  BinaryConnect did; that needs about 7 GB of memory. Pixels are scaled to
  ``[-1, 1]``.

  Args:
    data_dir: directory holding the .mat files.
    use_extra: also train on ``extra_32x32.mat``.

  Returns:
    An :class:`ImageDataset` with images of shape ``(N, 32, 32, 3)`` and 10 classes.

  Raises:
    DataError: missing directory or files, unreadable or corrupted files.
  """
  hint = "put train_32x32.mat and test_32x32.mat (and extra_32x32.mat to use it) in it"
  root = _check_dir(data_dir, "SVHN", hint)
  names = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if use_extra else [])
  _check_files(root, names, "SVHN", hint)
  train_x, train_y = _read_svhn_mat(root / "train_32x32.mat")
  test_x, test_y = _read_svhn_mat(root / "test_32x32.mat")
  n_val = min(_SVHN_VAL_SIZE, len(train_y) // 10)
  train, val = _split_off_tail(train_x, train_y, n_val, str(root / "train_32x32.mat"))
  train_x, train_y = train
  if use_extra:
    extra_x, extra_y = _read_svhn_mat(root / "extra_32x32.mat")
    train_x = np.concatenate([train_x, extra_x])
    train_y = np.concatenate([train_y, extra_y])
  return ImageDataset(
    "svhn",
    ImageSplit(_to_unit_range(train_x), train_y),
    ImageSplit(_to_unit_range(val.images), val.labels),
    ImageSplit(_to_unit_range(test_x), test_y),
    10,
  )


def load_image_dataset(
  name: str, data_dir: _PathLike | None = None, *, seed: int = 0, svhn_extra: bool = False
) -> ImageDataset:
  """Loads one of :data:`IMAGE_DATASETS` by name.

  Args:
    name: ``"digits"``, ``"mnist"``, ``"cifar10"`` or ``"svhn"``.
    data_dir: directory of the dataset's files; not used by ``"digits"``.
    seed: seed of the digits split; the other datasets have fixed splits.
    svhn_extra: for ``"svhn"``, also train on ``extra_32x32.mat``.

  Returns:
    The :class:`ImageDataset`.

  Raises:
    DataError: unknown name, no ``data_dir`` for a dataset that needs one, or
      any error of the dataset's loader.
  """
  if name not in IMAGE_DATASETS:
    raise DataError(f"unknown image dataset {name!r}: choose one of {', '.join(IMAGE_DATASETS)}")
  if name == "digits":
    return load_digits(seed)
  if data_dir is None:
    raise DataError(
      f"the {name} dataset cannot be downloaded here: give the directory holding its files"
    )
  if name == "mnist":
    return load_mnist(data_dir)
  if name == "cifar10":
    return load_cifar10(data_dir)
  return load_svhn(data_dir, use_extra=svhn_extra)


def iterate_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  rng: np.random.Generator | None = None,
  *,
  drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(images, labels)`` minibatches.

  Args:
    images: ``(N, ...)`` array.
    labels: ``(N,)`` array.
    batch_size: examples per batch.
    rng: when given, the order is a fresh permutation drawn from it (call once
      per epoch); when ``None``, the original order.
    drop_remainder: drop the last ``N % batch_size`` examples so that every
      batch has the same shape (for training); by default the last, smaller
      batch is kept so that evaluation sees every example.

  Yields:
    ``(images[idx], labels[idx])`` for consecutive index blocks.

  Raises:
    DataError: ``batch_size < 1``, mismatched lengths, or fewer than
      ``batch_size`` examples when ``drop_remainder`` is set.

  Examples:
    >>> x, y = np.zeros((5, 2, 2, 1), np.float32), np.arange(5)
    >>> [b.tolist() for _, b in iterate_batches(x, y, 2)]
    [[0, 1], [2, 3], [4]]
    >>> [b.tolist() for _, b in iterate_batches(x, y, 2, drop_remainder=True)]
    [[0, 1], [2, 3]]
  """
  n = len(labels)
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1, got {batch_size}")
  if len(images) != n:
    raise DataError(f"{len(images)} images but {n} labels: they must match one to one")
  if drop_remainder and n < batch_size:
    raise DataError(
      f"{n} examples are fewer than one batch of batch_size={batch_size}: lower batch_size"
    )
  order = rng.permutation(n) if rng is not None else None
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    if order is None:
      yield images[start : start + batch_size], labels[start : start + batch_size]
    else:
      idx = order[start : start + batch_size]
      yield images[idx], labels[idx]

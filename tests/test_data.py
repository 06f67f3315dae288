"""The data loaders on small files in the real formats, written by the tests themselves."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import sklearn.datasets

from lab_optax.experiments import data

DataError = data.DataError


def assert_names(excinfo, *parts):
  """The message is one line and mentions every part (a path, a file name, a number)."""
  message = str(excinfo.value)
  assert "\n" not in message
  for part in parts:
    assert str(part) in message, (part, message)


# ---------------------------------------------------------------------------
# Writers of the real formats.


def write_idx(path, array, magic, *, gz=False):
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  Path(path).write_bytes(gzip.compress(payload) if gz else payload)
  return Path(path)


def mnist_arrays(n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  images[0, 0, 0], images[0, 27, 27] = 0, 255
  return images, rng.integers(0, 10, n, dtype=np.uint8)


def write_mnist(directory, *, n_train=12, n_test=4, gz=False):
  directory.mkdir(parents=True, exist_ok=True)
  suffix = ".gz" if gz else ""
  arrays = {}
  for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
    images, labels = mnist_arrays(n, seed)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, gz=gz)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, gz=gz)
    arrays[prefix] = (images, labels)
  return arrays


def cifar_batch(n, seed):
  rng = np.random.default_rng(seed)
  return {
    b"batch_label": b"training batch",
    b"labels": [int(v) for v in rng.integers(0, 10, n)],
    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    b"filenames": [b"img%d.png" % i for i in range(n)],
  }


def python2_pickle(obj):
  """A protocol-2 pickle naming numpy.core, as the official batches (Python 2, numpy 1) do."""
  blob = pickle.dumps(obj, protocol=2)
  return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(directory, *, n=4):
  directory.mkdir(parents=True, exist_ok=True)
  batches = {}
  for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
    batches[name] = cifar_batch(n, seed=i)
    (directory / name).write_bytes(python2_pickle(batches[name]))
  return batches


def svhn_arrays(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
  y = rng.integers(1, 11, (n, 1), dtype=np.uint8)
  y[0, 0] = 10  # the digit 0
  return x, y


def write_svhn(directory, *, n_train=30, n_test=5, n_extra=None):
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {}
  sizes = {"train": n_train, "test": n_test} | ({"extra": n_extra} if n_extra else {})
  for seed, (name, n) in enumerate(sizes.items()):
    x, y = svhn_arrays(n, seed)
    scipy.io.savemat(directory / f"{name}_32x32.mat", {"X": x, "y": y})
    arrays[name] = (x, y)
  return arrays


# ---------------------------------------------------------------------------
# Digits.


def test_load_digits_shapes_scaling_and_stratified_split():
  ds = data.load_digits()
  assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (8, 8, 1)
  sizes = [len(s.labels) for s in (ds.train, ds.val, ds.test)]
  assert sizes == [1077, 360, 360]
  for split in (ds.train, ds.val, ds.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.shape == (len(split.labels), 8, 8, 1)
    assert split.images.min() == -1.0 and split.images.max() == 1.0
  # Stratified: every class holds its share (about 36 of 360) of the held-out splits.
  for split in (ds.val, ds.test):
    counts = np.bincount(split.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38, counts
  # The splits are disjoint: together they are a permutation of the 1797 digits.
  splits = (ds.train, ds.val, ds.test)
  everything = np.concatenate([s.images.reshape(len(s.labels), -1) for s in splits])
  original = sklearn.datasets.load_digits().data.astype(np.float32) / 8 - 1
  assert sorted(map(bytes, everything)) == sorted(map(bytes, original))


def test_load_digits_is_deterministic_per_seed():
  a, b, c = data.load_digits(0), data.load_digits(0), data.load_digits(1)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  assert not np.array_equal(a.test.labels, c.test.labels)


# ---------------------------------------------------------------------------
# MNIST.


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx_files(tmp_path, gz):
  arrays = write_mnist(tmp_path, gz=gz)
  ds = data.load_mnist(tmp_path)
  assert ds.name == "mnist" and ds.input_shape == (28, 28, 1) and ds.num_classes == 10
  # 12 training images: the last 12 // 6 = 2 validate.
  assert [len(s.labels) for s in (ds.train, ds.val, ds.test)] == [10, 2, 4]
  train_images, train_labels = arrays["train"]
  expected = train_images.astype(np.float32)[..., None] / 127.5 - 1
  np.testing.assert_allclose(np.concatenate([ds.train.images, ds.val.images]), expected, atol=1e-6)
  np.testing.assert_array_equal(ds.val.labels, train_labels[10:])
  np.testing.assert_array_equal(ds.test.labels, arrays["t10k"][1])
  assert ds.train.images[0, 0, 0, 0] == -1.0 and ds.train.images[0, 27, 27, 0] == 1.0
  assert ds.train.images.dtype == np.float32 and ds.train.labels.dtype == np.int32


def test_load_mnist_accepts_dotted_names_and_load_image_dataset(tmp_path):
  write_mnist(tmp_path)
  for path in tmp_path.iterdir():
    path.rename(tmp_path / path.name.replace("-idx", ".idx"))
  ds = data.load_image_dataset("mnist", tmp_path)
  assert len(ds.test.labels) == 4


def test_load_mnist_missing_directory_and_files(tmp_path):
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path / "nowhere")
  assert_names(excinfo, tmp_path / "nowhere", "does not exist")
  write_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  (tmp_path / "train-images-idx3-ubyte").unlink()
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, tmp_path, "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte")
  assert "train-labels" not in str(excinfo.value)


def test_load_mnist_data_dir_is_a_file(tmp_path):
  file = tmp_path / "file"
  file.write_text("x")
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(file)
  assert_names(excinfo, file, "not a directory")


def test_load_mnist_unreadable_file(tmp_path):
  write_mnist(tmp_path)
  labels = tmp_path / "train-labels-idx1-ubyte"
  labels.unlink()
  labels.mkdir()  # Present but unreadable, whatever the user's privileges.
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, labels, "cannot read")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_load_mnist_file_without_read_permission(tmp_path):
  write_mnist(tmp_path)
  images = tmp_path / "t10k-images-idx3-ubyte"
  images.chmod(0)
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, images, "cannot read")


def test_load_mnist_bad_magic_number(tmp_path):
  write_mnist(tmp_path)
  labels = tmp_path / "t10k-labels-idx1-ubyte"
  # An image file where a label file should be.
  write_idx(labels, np.zeros((4, 28, 28), np.uint8), 2051)
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, labels, "magic number 2051", "expected 2049")


def test_load_mnist_gzipped_file_without_gz_suffix(tmp_path):
  write_mnist(tmp_path, gz=True)
  images = tmp_path / "train-images-idx3-ubyte"
  (tmp_path / "train-images-idx3-ubyte.gz").rename(images)
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, images, "magic number")


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_truncated_file(tmp_path, gz):
  write_mnist(tmp_path, gz=gz)
  images = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
  images.write_bytes(images.read_bytes()[:-100])
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, images, "truncated")


def test_load_mnist_not_gzip_and_short_header(tmp_path):
  write_mnist(tmp_path, gz=True)
  images = tmp_path / "t10k-images-idx3-ubyte.gz"
  images.write_bytes(b"this is not gzip")
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, images, "gzip")
  images.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00"))
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, images, "header")
  # A header claiming 2^93 bytes of pixels, far more than the file (or an int64) holds.
  huge = (2051).to_bytes(4, "big") + (2**31).to_bytes(4, "big") * 3 + bytes(10)
  images.write_bytes(gzip.compress(huge))
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, images, "header says 2147483648x2147483648x2147483648", "holds 10")


def test_load_mnist_inconsistent_sizes(tmp_path):
  write_mnist(tmp_path)
  labels = tmp_path / "train-labels-idx1-ubyte"
  write_idx(labels, np.zeros(11, np.uint8), 2049)
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, labels, tmp_path / "train-images-idx3-ubyte", "12 images", "11 labels")
  # Right count, wrong contents: a label outside 0..9.
  write_idx(labels, np.full(12, 10, np.uint8), 2049)
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, labels, "labels must lie in [0, 10)")


def test_load_mnist_too_few_training_images(tmp_path):
  write_mnist(tmp_path, n_train=5)
  with pytest.raises(DataError) as excinfo:
    data.load_mnist(tmp_path)
  assert_names(excinfo, "train-images-idx3-ubyte", "too few")


# ---------------------------------------------------------------------------
# CIFAR-10.


@pytest.mark.parametrize("subdir", [False, True])
def test_load_cifar10_reads_python_batches(tmp_path, subdir):
  batches = write_cifar(tmp_path / "cifar-10-batches-py" if subdir else tmp_path)
  ds = data.load_cifar10(tmp_path)
  assert ds.name == "cifar10" and ds.input_shape == (32, 32, 3) and ds.num_classes == 10
  # 5 batches of 4 images: the last 20 // 10 = 2 validate.
  assert [len(s.labels) for s in (ds.train, ds.val, ds.test)] == [18, 2, 4]
  first = batches["data_batch_1"]
  # Channel-major rows: value c * 1024 + r * 32 + col is channel c of pixel (r, col).
  raw = first[b"data"][1]
  for r, col, c in [(0, 0, 0), (5, 17, 1), (31, 31, 2)]:
    expected = raw[c * 1024 + r * 32 + col] / 127.5 - 1
    np.testing.assert_allclose(ds.train.images[1, r, col, c], expected, atol=1e-6)
  np.testing.assert_array_equal(ds.train.labels[:4], first[b"labels"])
  np.testing.assert_array_equal(ds.val.labels, batches["data_batch_5"][b"labels"][2:])
  np.testing.assert_array_equal(ds.test.labels, batches["test_batch"][b"labels"])
  assert (
    ds.test.images.dtype == np.float32 and -1 <= ds.test.images.min() < ds.test.images.max() <= 1
  )


def test_load_cifar10_accepts_python3_str_keys(tmp_path):
  write_cifar(tmp_path)
  batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
  (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
  ds = data.load_cifar10(tmp_path)
  np.testing.assert_array_equal(ds.test.labels, [0, 1, 2, 3])
  assert np.all(ds.test.images == -1.0)


def test_load_cifar10_missing_files(tmp_path):
  with pytest.raises(DataError) as excinfo:
    data.load_cifar10(tmp_path / "nowhere")
  assert_names(excinfo, tmp_path / "nowhere")
  write_cifar(tmp_path)
  (tmp_path / "data_batch_3").unlink()
  with pytest.raises(DataError) as excinfo:
    data.load_cifar10(tmp_path)
  assert_names(excinfo, tmp_path, "data_batch_3", "cifar-10-python.tar.gz")
  assert "data_batch_2" not in str(excinfo.value)


class _Payload:
  """Pickles to a call of ``open(marker, "w")``: a file appears if the pickle runs code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize(
  "blob, message",
  [
    (b"garbage, not a pickle", "not a readable CIFAR-10 python batch"),
    (python2_pickle(cifar_batch(4, 0))[:-50], "not a readable CIFAR-10 python batch"),
    (pickle.dumps([1, 2, 3], protocol=2), "expected a pickled dict"),
    (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}, protocol=2), "lacks key(s) ['labels']"),
    (
      pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, protocol=2),
      "(N, 3072)",
    ),
    (
      pickle.dumps({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, protocol=2),
      "uint8",
    ),
    (
      pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, protocol=2),
      "4 integers",
    ),
    (
      pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 99]}, protocol=2),
      "[0, 10)",
    ),
  ],
)
def test_load_cifar10_corrupted_batch(tmp_path, blob, message):
  write_cifar(tmp_path)
  bad = tmp_path / "data_batch_4"
  bad.write_bytes(blob)
  with pytest.raises(DataError) as excinfo:
    data.load_cifar10(tmp_path)
  assert_names(excinfo, bad, message)


def test_load_cifar10_refuses_pickles_that_run_code(tmp_path):
  write_cifar(tmp_path)
  marker = tmp_path / "marker"
  bad = tmp_path / "test_batch"
  bad.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": []}, protocol=2))
  with pytest.raises(DataError) as excinfo:
    data.load_cifar10(tmp_path)
  assert_names(excinfo, bad, "refusing to load")
  assert not marker.exists()


# ---------------------------------------------------------------------------
# SVHN.


def test_load_svhn_reads_mat_files(tmp_path):
  arrays = write_svhn(tmp_path)
  ds = data.load_svhn(tmp_path)
  assert ds.name == "svhn" and ds.input_shape == (32, 32, 3) and ds.num_classes == 10
  # 30 training images: the last min(6000, 30 // 10) = 3 validate.
  assert [len(s.labels) for s in (ds.train, ds.val, ds.test)] == [27, 3, 5]
  x, y = arrays["train"]
  for i, r, c, ch in [(0, 0, 0, 0), (4, 9, 30, 2), (26, 31, 1, 1)]:
    np.testing.assert_allclose(ds.train.images[i, r, c, ch], x[r, c, ch, i] / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(ds.val.images[0, 3, 4, 1], x[3, 4, 1, 27] / 127.5 - 1, atol=1e-6)
  assert ds.train.labels[0] == 0  # label 10 is the digit 0
  np.testing.assert_array_equal(ds.train.labels, y[:27, 0] % 10)
  np.testing.assert_array_equal(ds.test.labels, arrays["test"][1][:, 0] % 10)
  assert ds.train.labels.dtype == np.int32 and ds.train.images.dtype == np.float32


def test_load_svhn_extra(tmp_path):
  arrays = write_svhn(tmp_path, n_extra=7)
  ds = data.load_svhn(tmp_path, use_extra=True)
  assert [len(s.labels) for s in (ds.train, ds.val, ds.test)] == [27 + 7, 3, 5]
  np.testing.assert_array_equal(ds.train.labels[27:], arrays["extra"][1][:, 0] % 10)
  assert len(data.load_image_dataset("svhn", tmp_path).train.labels) == 27


def test_load_svhn_missing_files(tmp_path):
  write_svhn(tmp_path)
  with pytest.raises(DataError) as excinfo:
    data.load_svhn(tmp_path, use_extra=True)
  assert_names(excinfo, tmp_path, "missing SVHN file(s) extra_32x32.mat;")
  (tmp_path / "test_32x32.mat").unlink()
  with pytest.raises(DataError) as excinfo:
    data.load_svhn(tmp_path)
  assert_names(excinfo, tmp_path, "missing SVHN file(s) test_32x32.mat;")


@pytest.mark.parametrize(
  "contents, message",
  [
    ({"X": np.zeros((32, 32, 3, 4), np.uint8)}, "lacks variable(s) ['y']"),
    ({"X": np.zeros((32, 32, 4), np.uint8), "y": np.ones((4, 1), np.uint8)}, "(32, 32, 3, N)"),
    ({"X": np.zeros((32, 32, 3, 4)), "y": np.ones((4, 1), np.uint8)}, "uint8"),
    ({"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1), np.uint8)}, "4 labels"),
    ({"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.zeros((4, 1), np.uint8)}, "[1, 10]"),
  ],
)
def test_load_svhn_bad_contents(tmp_path, contents, message):
  write_svhn(tmp_path)
  bad = tmp_path / "test_32x32.mat"
  scipy.io.savemat(bad, contents)
  with pytest.raises(DataError) as excinfo:
    data.load_svhn(tmp_path)
  assert_names(excinfo, bad, message)


def test_load_svhn_corrupted_and_unreadable_file(tmp_path):
  write_svhn(tmp_path)
  bad = tmp_path / "train_32x32.mat"
  bad.write_bytes(b"not a MATLAB file at all" * 10)
  with pytest.raises(DataError) as excinfo:
    data.load_svhn(tmp_path)
  assert_names(excinfo, bad, "not a readable MATLAB file")
  bad.unlink()
  bad.mkdir()
  with pytest.raises(DataError) as excinfo:
    data.load_svhn(tmp_path)
  assert_names(excinfo, bad, "cannot read")


# ---------------------------------------------------------------------------
# By name, and image batches.


def test_load_image_dataset_errors(tmp_path):
  assert data.load_image_dataset("digits").name == "digits"
  with pytest.raises(DataError) as excinfo:
    data.load_image_dataset("imagenet", tmp_path)
  assert_names(excinfo, "imagenet", "mnist")
  with pytest.raises(DataError) as excinfo:
    data.load_image_dataset("cifar10")
  assert_names(excinfo, "cifar10", "directory")


def test_iterate_batches_evaluation_order_keeps_every_example():
  x = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
  y = np.arange(7)
  batches = list(data.iterate_batches(x, y, 3))
  assert [b.tolist() for _, b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
  for images, labels in batches:
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)


def test_iterate_batches_shuffles_deterministically():
  x, y = np.arange(10)[:, None], np.arange(10)

  def epoch(seed, **kwargs):
    rng = np.random.default_rng(seed)
    return [b for _, b in data.iterate_batches(x, y, 4, rng, **kwargs)]

  a, b, c = epoch(0), epoch(0), epoch(1)
  assert [len(v) for v in a] == [4, 4, 2]
  assert sorted(np.concatenate(a).tolist()) == list(range(10))
  assert np.concatenate(a).tolist() != list(range(10))
  assert all(np.array_equal(u, v) for u, v in zip(a, b))
  assert not all(np.array_equal(u, v) for u, v in zip(a, c))
  dropped = epoch(0, drop_remainder=True)
  assert [len(v) for v in dropped] == [4, 4]
  # Same permutation, minus its tail.
  np.testing.assert_array_equal(np.concatenate(dropped), np.concatenate(a)[:8])


def test_iterate_batches_errors():
  x, y = np.zeros((3, 1)), np.zeros(3)
  with pytest.raises(DataError, match="batch_size"):
    next(data.iterate_batches(x, y, 0))
  with pytest.raises(DataError, match="2 images but 3 labels"):
    next(data.iterate_batches(x[:2], y, 2))
  with pytest.raises(DataError, match="fewer than one batch"):
    next(data.iterate_batches(x, y, 4, drop_remainder=True))


# ---------------------------------------------------------------------------
# Text.


def test_load_text_file_and_nested_directory(tmp_path):
  root = tmp_path / "corpus"
  (root / "a" / "b").mkdir(parents=True)
  (root / ".git").mkdir()
  (root / "b.txt").write_text("bee\n")
  (root / "a" / "z.h").write_text("zed")  # no final newline: one is added
  (root / "a" / "b" / "c.h").write_text("\ufeffsee\n", encoding="utf-8")  # BOM dropped
  (root / "a" / "binary.o").write_bytes(b"\x7fELF\x00\x01\x02")
  (root / "a" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  (root / ".hidden").write_text("hidden\n")
  (root / ".git" / "config").write_text("[core]\n")
  assert data.load_text(root) == "see\nzed\nbee\n"
  assert data.load_text(root / "a" / "z.h") == "zed"
  # A file named explicitly is read even when it is not valid UTF-8.
  assert data.load_text(root / "a" / "latin1.txt") == "caf\ufffd\n"


def test_load_text_errors(tmp_path):
  with pytest.raises(DataError) as excinfo:
    data.load_text(tmp_path / "missing.txt")
  assert_names(excinfo, tmp_path / "missing.txt", "does not exist")
  binary = tmp_path / "a.out"
  binary.write_bytes(b"\x7fELF\x00\x00")
  with pytest.raises(DataError) as excinfo:
    data.load_text(binary)
  assert_names(excinfo, binary, "binary")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "lib.so").write_bytes(b"\x00\x01")
  with pytest.raises(DataError) as excinfo:
    data.load_text(empty)
  assert_names(excinfo, empty, "no UTF-8 text")


@pytest.mark.skipif(not os.path.isdir(data.DEFAULT_TEXT_PATH), reason="no kernel headers here")
def test_default_text_path_loads():
  text = data.load_text()
  assert len(text) > 1_000_000 and "#define" in text
  corpus = data.make_char_dataset(text)
  assert 60 < corpus.vocab_size < 200
  n = len(text)
  assert len(corpus.train) == int(0.9 * n) and len(corpus.val) == int(0.05 * n)
  assert len(corpus.train) + len(corpus.val) + len(corpus.test) == n
  assert corpus.decode(corpus.val[:200]) == text[int(0.9 * n) :][:200]


def test_make_char_dataset_vocabulary_and_contiguous_split():
  text = "".join(chr(ord("a") + i % 7) for i in range(100)) + "é€"
  corpus = data.make_char_dataset(text, split=(0.8, 0.1, 0.1))
  assert corpus.chars == "abcdefgé€" and corpus.vocab_size == 9
  assert [len(corpus.train), len(corpus.val), len(corpus.test)] == [81, 10, 11]
  ids = np.concatenate([corpus.train, corpus.val, corpus.test])
  assert ids.dtype == np.int32 and corpus.decode(ids) == text
  np.testing.assert_array_equal(corpus.encode(text), ids)
  with pytest.raises(DataError, match="'z' is not in the corpus vocabulary"):
    corpus.encode("abz")


@pytest.mark.parametrize("split", [(0.9, 0.1), (0.9, 0.1, 0.0), (0.5, 0.3, 0.3)])
def test_make_char_dataset_bad_split(split):
  with pytest.raises(DataError, match="split must be three positive fractions"):
    data.make_char_dataset("abcdefgh" * 10, split=split)


def test_make_char_dataset_text_too_short():
  with pytest.raises(DataError) as excinfo:
    data.make_char_dataset("a" * 30)
  assert_names(excinfo, "30 characters", "val split gets 1")


def test_char_batches_windows_and_targets():
  ids = np.arange(3 * 2 * 5 + 4, dtype=np.int32)  # 6 full windows of 5, plus a spare
  batches = list(data.char_batches(ids, batch_size=2, timesteps=5))
  assert len(batches) == 3
  starts = []
  for inputs, targets in batches:
    assert inputs.shape == targets.shape == (2, 5)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(targets, inputs + 1)  # ids are positions here
    starts += inputs[:, 0].tolist()
  assert starts == [0, 5, 10, 15, 20, 25]


def test_char_batches_shuffle_is_deterministic_and_non_overlapping():
  rng_ids = np.random.default_rng(3)
  ids = rng_ids.integers(0, 50, 10 * 7 * 4 + 13).astype(np.int32)

  def epoch(seed):
    return list(data.char_batches(ids, 4, 7, np.random.default_rng(seed)))

  a, b, c = epoch(0), epoch(0), epoch(1)
  assert len(a) == 10
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
  # Each window is a slice of the text at a multiple of timesteps, used at most once.
  windows = [(x, y) for xs, ys in a for x, y in zip(xs, ys)]
  starts = []
  for x, y in windows:
    matches = [s for s in range(0, len(ids) - 7, 7) if np.array_equal(ids[s : s + 7], x)]
    assert matches, x
    start = matches[0]
    np.testing.assert_array_equal(y, ids[start + 1 : start + 8])
    starts.append(start)
  assert len(set(starts)) == len(starts) == 40
  assert starts != sorted(starts)


def test_char_batches_too_short():
  ids = np.zeros(100, np.int32)
  with pytest.raises(DataError) as excinfo:
    next(data.char_batches(ids, batch_size=10, timesteps=10, split="test"))
  assert_names(excinfo, "test split", "100 characters", "needs 101")
  assert len(list(data.char_batches(np.zeros(101, np.int32), 10, 10))) == 1
  with pytest.raises(DataError, match="timesteps"):
    next(data.char_batches(ids, batch_size=1, timesteps=0))


def test_char_eval_batches_cover_the_split_once_with_fixed_shapes():
  ids = np.random.default_rng(0).integers(0, 9, 47).astype(np.int32)
  inputs, targets, masks = zip(*data.char_eval_batches(ids, batch_size=3, timesteps=4))
  assert {x.shape for x in inputs + targets + masks} == {(3, 4)}
  assert len(inputs) == 4  # ceil(46 / 4) = 12 windows, 4 batches of 3
  order = np.concatenate([m.ravel() for m in masks])
  assert order.sum() == 46 and order[:46].all()
  np.testing.assert_array_equal(np.concatenate([t.ravel() for t in targets])[:46], ids[1:])
  np.testing.assert_array_equal(np.concatenate([x.ravel() for x in inputs])[:46], ids[:-1])
  with pytest.raises(DataError) as excinfo:
    next(data.char_eval_batches(ids[:1], 3, 4, split="val"))
  assert_names(excinfo, "val split", "1 character")

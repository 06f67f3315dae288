"""Real MNIST, read from ``../shared/data/mnist`` beside the repository root.

The project's machines and CI have the four official IDX files there (gzipped); a
user's fresh clone does not, and these tests skip. They fail when the MNIST path
breaks: the files read as the official counts, shapes and pixels, and a short
training run through the command line reaches a stated error, with its packed
model exactly as good as the float one on the 10,000 test images.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from lab_optax.experiments import cli
from lab_optax.experiments.data import load_mnist

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(
  not MNIST_DIR.is_dir(), reason=f"no real MNIST at {MNIST_DIR} (only the project's machines)"
)

# Per class, 0 to 9, as in the official files (and in ../shared/data/mnist/README.md).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_MEAN_PIXEL = 33.318  # of the 60,000 training images, 0..255


def test_the_files_read_as_the_official_mnist():
  dataset = load_mnist(MNIST_DIR)
  train, val, test = dataset.train, dataset.val, dataset.test
  # The paper's split: the last 10,000 training images are the validation set.
  assert train.images.shape == (50000, 28, 28, 1)
  assert val.images.shape == test.images.shape == (10000, 28, 28, 1)
  assert dataset.num_classes == 10 and dataset.input_shape == (28, 28, 1)
  for split in (train, val, test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.min() == -1.0 and split.images.max() == 1.0
  labels = np.concatenate([train.labels, val.labels])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), TEST_COUNTS)
  pixels = (np.concatenate([train.images, val.images]).astype(np.float64) + 1.0) * 127.5
  assert abs(pixels.mean() - TRAIN_MEAN_PIXEL) < 5e-4
  # The official training set starts with a 5, a 0 and a 4, and the test set with a 7, a 2, a 1.
  assert list(train.labels[:3]) == [5, 0, 4] and list(test.labels[:3]) == [7, 2, 1]


def test_a_short_lab_run_reaches_its_error_and_its_packed_model_matches(tmp_path, capsys):
  # One epoch of LAB on the 50,000 training images with 64 hidden units: 5.81% test error
  # when this test was written (AMD EPYC, JAX 0.10.2); a broken loader (labels out of step
  # with the images, pixels wrongly scaled) is far above the bound.
  out, exported = tmp_path / "run", tmp_path / "models"
  args = ["mlp", "--dataset", "mnist", "--data-dir", str(MNIST_DIR), "--hidden", "64"]
  args += ["--epochs", "1", "--methods", "lab", "--no-progress", "--out", str(out)]
  assert cli.main([*args, "--export", str(exported)]) == 0
  assert "paper" not in capsys.readouterr().out  # Table 1's column is for 2048 units only
  (record,) = json.loads((out / "results.json").read_text())["results"]
  assert record["test_error"] < 8.0
  # Batch norms folded, kernels packed to 1 bit, loaded back from the file: the same test
  # error on the 10,000 test images as the float model.
  export = record["export"]
  assert export["test_error_packed"] == export["test_error_float"] == record["test_curve"][-1]
  assert export["float32_bytes"] / export["bytes"] > 14

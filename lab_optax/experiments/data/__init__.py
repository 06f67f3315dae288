"""Data loaders of the paper's experiments: images (digits, MNIST, CIFAR-10, SVHN) and text.

Nothing here downloads anything. The 8x8 digits ship inside scikit-learn and the
default text corpus (the Linux kernel's UAPI headers) is a system directory; for
MNIST, CIFAR-10 and SVHN the user points a loader at a directory holding the
standard distribution files. Every problem with the data (missing or unreadable
files, corrupted contents, a split too short for one batch) raises
:class:`DataError` with a one-line message that names the file and says what to
do, so a command line can report it without a traceback.

The images live in :mod:`~lab_optax.experiments.data.images`, the text in
:mod:`~lab_optax.experiments.data.text`, and what they share (the error, the
check that a split holds one batch) in :mod:`~lab_optax.experiments.data.common`;
this package re-exports their public names.
"""

from lab_optax.experiments.data.common import DataError, check_batch_fits
from lab_optax.experiments.data.images import (
  IMAGE_DATASETS,
  ImageDataset,
  ImageSplit,
  iterate_batches,
  load_cifar10,
  load_digits,
  load_image_dataset,
  load_mnist,
  load_svhn,
)
from lab_optax.experiments.data.text import (
  DEFAULT_TEXT_PATH,
  CharCorpus,
  char_batches,
  char_eval_batches,
  load_text,
  make_char_dataset,
)

__all__ = (
  "DEFAULT_TEXT_PATH",
  "IMAGE_DATASETS",
  "CharCorpus",
  "DataError",
  "ImageDataset",
  "ImageSplit",
  "char_batches",
  "char_eval_batches",
  "check_batch_fits",
  "iterate_batches",
  "load_cifar10",
  "load_digits",
  "load_image_dataset",
  "load_mnist",
  "load_svhn",
  "load_text",
  "make_char_dataset",
)

"""Helpers for tests and quick trials: a synthetic MNIST-format dataset.

Examples:
  >>> import tempfile
  >>> from experiments import data
  >>> d = write_synthetic_mnist(tempfile.mkdtemp(), n_train=20, n_test=10)
  >>> data.load_mnist_split(d, 'train').images.shape
  (20, 28, 28, 1)
"""

from __future__ import annotations

import os

import numpy as np

from experiments import idx


def write_synthetic_mnist(path: str, n_train: int = 96, n_test: int = 40,
                          seed: int = 0, gz: bool = False) -> str:
  """Writes a learnable MNIST-format directory of IDX files.

  Class ``c`` is a bright horizontal band at rows ``2 + 2c .. 3 + 2c`` on
  noise, so a small network learns it in a few steps.

  Args:
    path: directory to create.
    n_train: training examples.
    n_test: test examples.
    seed: numpy seed.
    gz: write ``.gz`` files.

  Returns:
    ``path`` as a string.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(path, exist_ok=True)
  suffix = '.gz' if gz else ''
  for split, n in (('train', n_train), ('t10k', n_test)):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 + 2 * c:4 + 2 * c, 4:24] = 250
    idx.write_idx(os.path.join(path, f'{split}-images-idx3-ubyte{suffix}'),
                  images)
    idx.write_idx(os.path.join(path, f'{split}-labels-idx1-ubyte{suffix}'),
                  labels)
  return str(path)

"""Small data helpers for the common case: MNIST-format IDX files, batches.

Everything here is NumPy (no JAX, no TensorFlow): a training loop reads the
arrays once and feeds batches to its jitted step.

* :func:`read_idx` / :func:`write_idx`: the IDX file format of MNIST (raw or
  gzip-compressed), every header field validated;
* :func:`load_mnist`: the four MNIST arrays of a directory (MNIST, or any
  dataset in its format: Fashion-MNIST, KMNIST);
* :func:`batches`: a (shuffled) iterator of ``(images, labels)`` batches.

An IDX file is: two zero bytes, a type code byte, a byte with the number of
dimensions ``n``, ``n`` big-endian uint32 sizes, then the array data in
big-endian C order. A corrupt or truncated file raises
:class:`IdxFormatError` naming the file.

Examples:
  >>> import os, tempfile, numpy as np
  >>> d = tempfile.mkdtemp()
  >>> for split, n in (('train', 6), ('t10k', 4)):
  ...   write_idx(os.path.join(d, f'{split}-images-idx3-ubyte'),
  ...             np.zeros((n, 28, 28), np.uint8))
  ...   write_idx(os.path.join(d, f'{split}-labels-idx1-ubyte'),
  ...             np.arange(n, dtype=np.uint8))
  >>> train_x, train_y, test_x, test_y = load_mnist(d)
  >>> train_x.shape, train_x.dtype, test_y.tolist()
  ((6, 28, 28, 1), dtype('uint8'), [0, 1, 2, 3])
  >>> [y.tolist() for _, y in batches(train_x, train_y, 4)]  # in order
  [[0, 1, 2, 3]]
"""

from __future__ import annotations

from collections.abc import Iterator
import gzip
import os
import struct
import zlib

import numpy as np

__all__ = [
    'IDX_DTYPES',
    'IdxFormatError',
    'MNIST_FILES',
    'MNIST_MEAN',
    'MNIST_STD',
    'batches',
    'load_mnist',
    'read_idx',
    'write_idx',
]

#: IDX type code -> big-endian numpy dtype (the IDX specification's table).
IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
#: The MNIST file names of each split (``.gz`` and ``train-images.idx3-ubyte``
#: style names are found too).
MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
#: Mean and standard deviation of MNIST's training pixels scaled to [0, 1]
#: (torchvision's normalisation).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_GZIP_MAGIC = b'\x1f\x8b'


class IdxFormatError(ValueError):
  """A file is not a valid IDX file (bad magic, type code, dims or length)."""


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
      raise IdxFormatError(
          f'{path}: corrupt or truncated gzip stream ({e}).') from e
  return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (raw, or gzip-compressed: detected by content).

  Args:
    path: the file.

  Returns:
    The array, in native byte order, with the file's dtype and shape.

  Raises:
    FileNotFoundError: the file does not exist.
    IdxFormatError: bad magic number, unknown type code, or a data length
      that does not match the dimensions.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), 'labels-idx1-ubyte')
    >>> write_idx(path, np.array([3, 1, 4], np.uint8))
    >>> read_idx(path).tolist()
    [3, 1, 4]
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'IDX file not found: {path}')
  data = _read_bytes(path)
  if len(data) < 4:
    raise IdxFormatError(
        f'{path}: {len(data)} bytes, too short for an IDX header (4 bytes).')
  if data[0] != 0 or data[1] != 0:
    raise IdxFormatError(
        f'{path}: bad magic number 0x{data[:4].hex()} (an IDX file starts '
        'with two zero bytes).')
  code, ndim = data[2], data[3]
  if code not in IDX_DTYPES:
    raise IdxFormatError(
        f'{path}: unknown IDX type code 0x{code:02x} (valid: '
        f'{", ".join(f"0x{c:02x}" for c in IDX_DTYPES)}).')
  if ndim == 0:
    raise IdxFormatError(f'{path}: IDX header declares 0 dimensions.')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(
        f'{path}: truncated header ({len(data)} bytes, {ndim} dims need '
        f'{header}).')
  dims = struct.unpack(f'>{ndim}I', data[4:header])
  dtype = IDX_DTYPES[code]
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  actual = len(data) - header
  if actual != expected:
    kind = 'truncated' if actual < expected else 'has trailing bytes'
    raise IdxFormatError(
        f'{path}: file {kind}: dims {tuple(dims)} of {dtype.name} need '
        f'{expected} data bytes, found {actual}.')
  array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
  return array.astype(dtype.newbyteorder('='), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file (gzip-compressed if ``path`` ends .gz).

  Args:
    path: destination file.
    array: a numpy array of dtype uint8, int8, int16, int32, float32 or
      float64 with at least one dimension.

  Raises:
    ValueError: the dtype has no IDX type code, or the array is 0-d.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), 'a-idx2-float')
    >>> write_idx(path, np.eye(2, dtype=np.float32))
    >>> read_idx(path).dtype
    dtype('float32')
  """
  array = np.asarray(array)
  if array.ndim == 0 or array.ndim > 255:
    raise ValueError(f'IDX needs 1 to 255 dimensions, got shape '
                     f'{array.shape}.')
  codes = {dt.newbyteorder('=').str: c for c, dt in IDX_DTYPES.items()}
  key = array.dtype.newbyteorder('=').str
  if key not in codes:
    raise ValueError(f'dtype {array.dtype} has no IDX type code (use one of '
                     'uint8, int8, int16, int32, float32, float64).')
  code = codes[key]
  header = struct.pack('>BBBB', 0, 0, code, array.ndim)
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  payload = header + np.ascontiguousarray(
      array, dtype=IDX_DTYPES[code]).tobytes()
  path = os.fspath(path)
  if path.endswith('.gz'):
    payload = gzip.compress(payload, mtime=0)
  with open(path, 'wb') as f:
    f.write(payload)


def _find_file(data_dir: str, name: str) -> str:
  for candidate in (name, name.replace('-idx', '.idx')):
    for suffix in ('', '.gz'):
      path = os.path.join(data_dir, candidate + suffix)
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(
      f'MNIST file {name}[.gz] not found in data_dir={data_dir!r} (expected '
      'train-images-idx3-ubyte, train-labels-idx1-ubyte, '
      't10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, raw or .gz; '
      '`python -m experiments.fetch_data mnist` writes them to data/mnist).')


def _load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  image_name, label_name = MNIST_FILES[split]
  image_path = _find_file(data_dir, image_name)
  label_path = _find_file(data_dir, label_name)
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise IdxFormatError(f'{image_path}: expected uint8 images [N, H, W], got '
                         f'{images.dtype} {images.shape}.')
  if labels.ndim != 1:
    raise IdxFormatError(f'{label_path}: expected labels [N], got shape '
                         f'{labels.shape}.')
  if len(images) != len(labels):
    raise IdxFormatError(f'{image_path} has {len(images)} images but '
                         f'{label_path} has {len(labels)} labels.')
  return images[..., None], labels.astype(np.int32)


def load_mnist(data_dir: str | os.PathLike
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The four arrays of an MNIST-format directory of IDX files.

  Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (raw or ``.gz``;
  ``train-images.idx3-ubyte`` style names too). Any dataset in MNIST's format
  works. The files are not checked against MNIST's checksums (the
  experiments' loader, ``experiments.data``, does that).

  Args:
    data_dir: the directory (``python -m experiments.fetch_data mnist``
      writes MNIST to ``data/mnist``).

  Returns:
    ``(train_images, train_labels, test_images, test_labels)``: images
    ``uint8 [N, H, W, 1]`` (NHWC, one channel, values 0-255), labels
    ``int32 [N]``.

  Raises:
    FileNotFoundError: ``data_dir`` lacks a file (the message names it).
    IdxFormatError: a file is corrupt, holds the wrong kind of array, or the
      images and labels of a split differ in number.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> for split, n in (('train', 3), ('t10k', 2)):
    ...   write_idx(os.path.join(d, f'{split}-images-idx3-ubyte.gz'),
    ...             np.full((n, 28, 28), 255, np.uint8))
    ...   write_idx(os.path.join(d, f'{split}-labels-idx1-ubyte.gz'),
    ...             np.full(n, 7, np.uint8))
    >>> [a.shape for a in load_mnist(d)]
    [(3, 28, 28, 1), (3,), (2, 28, 28, 1), (2,)]
    >>> load_mnist(os.path.join(d, 'missing'))
    Traceback (most recent call last):
    ...
    FileNotFoundError: MNIST file train-images-idx3-ubyte[.gz] not found in data_dir=...
  """
  data_dir = os.fspath(data_dir)
  train_images, train_labels = _load_split(data_dir, 'train')
  test_images, test_labels = _load_split(data_dir, 'test')
  return train_images, train_labels, test_images, test_labels


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
            rng: np.random.Generator | int | None = None,
            drop_remainder: bool = True
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Iterates over ``(images, labels)`` batches, shuffled with ``rng``.

  One pass over the data (one epoch); call it again for the next epoch (a
  :class:`numpy.random.Generator` passed as ``rng`` gives a new order each
  time, an int seed the same order).

  Args:
    images: an array with the examples on its first axis.
    labels: an array with as many entries on its first axis.
    batch_size: examples per batch; positive.
    rng: ``None`` for the stored order (evaluation), else a
      :class:`numpy.random.Generator` or an int seed to shuffle with.
    drop_remainder: drop the last, smaller batch (training: every step has
      one shape, so ``jax.jit`` compiles once); ``False`` keeps it
      (evaluation over every example).

  Returns:
    An iterator of ``(images[idx], labels[idx])`` over consecutive blocks
    ``idx`` of ``batch_size`` indices of the (shuffled) order. The arguments
    are checked at the call, not at the first batch.

  Raises:
    ValueError: ``batch_size`` is not a positive int, ``images`` and
      ``labels`` differ in length, or ``rng`` is of another type.

  Examples:
    >>> import numpy as np
    >>> x, y = np.arange(10)[:, None], np.arange(10)
    >>> [b.tolist() for _, b in batches(x, y, 4, drop_remainder=False)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    >>> rng = np.random.default_rng(0)
    >>> sorted(int(v) for _, b in batches(x, y, 5, rng=rng) for v in b)
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  """
  if (not isinstance(batch_size, (int, np.integer))
      or isinstance(batch_size, bool) or batch_size <= 0):
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
  n = len(images)
  if len(labels) != n:
    raise ValueError(f'images and labels must have the same length, got '
                     f'len(images)={n} and len(labels)={len(labels)}.')
  if rng is None:
    order = np.arange(n)
  elif isinstance(rng, (np.random.Generator, int, np.integer)) and not (
      isinstance(rng, bool)):
    order = np.random.default_rng(rng).permutation(n)
  else:
    raise ValueError('rng must be None, an int seed or a '
                     f'numpy.random.Generator, got {type(rng).__name__}: '
                     f'{rng!r}.')
  stop = n - n % batch_size if drop_remainder else n
  # Checked above, at the call; the batches are cut as they are asked for.
  return ((images[order[i:i + batch_size]], labels[order[i:i + batch_size]])
          for i in range(0, stop, batch_size))

"""Input pipelines: MNIST from IDX files, CIFAR-10/100 and ImageNet from TFDS.

Everything here is numpy on the host (no TensorFlow). The pipeline emits
``uint8`` NHWC images and ``int32`` labels; normalisation by the dataset's
mean/std happens on device inside the train/eval step (cheaper transfers).

Data order is a pure function of ``(seed, step)``: epoch ``e`` uses the
permutation ``default_rng([seed, e]).permutation(num_train)``, global batch
``i`` of the epoch takes positions ``[i * B, (i + 1) * B)`` of it (the
remainder is dropped), and augmentation randomness is drawn from
``default_rng([seed, e, i])`` for the whole global batch. Each process
materialises only its own rows of every global batch. So the global batches
do not depend on the number of processes or devices, and a resumed run needs
nothing but the step number to continue the exact same stream.

Examples:
  >>> import numpy as np
  >>> images = np.zeros((10, 4, 4, 1), np.uint8)
  >>> labels = np.arange(10, dtype=np.int32)
  >>> stream = TrainStream(ArraySource(images, labels), global_batch_size=4,
  ...                      seed=0, transform=identity_transform)
  >>> stream.steps_per_epoch
  2
  >>> batch = stream.batch(0)
  >>> batch['image'].shape, batch['label'].dtype
  ((4, 4, 4, 1), dtype('int32'))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import numpy as np
from PIL import Image

from experiments import errors
from experiments import idx as idx_lib
from experiments import integrity

# Per-channel normalisation constants (on [0, 1] pixel values).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # torchvision's (not fixed by
# the paper's sources).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # official AdderNet main.py
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # standard torchvision ImageNet values
IMAGENET_STD = (0.229, 0.224, 0.225)

MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


class DataError(errors.UserError, ValueError):
  """A dataset is missing, corrupt or inconsistent with the config."""


# ----------------------------------------------------------------------------
# Sources: random access to (image, label) records.


class ArraySource:
  """In-memory examples: ``images[N, H, W, C]`` uint8 and ``labels[N]``.

  Examples:
    >>> import numpy as np
    >>> src = ArraySource(np.zeros((3, 2, 2, 1), np.uint8), np.arange(3))
    >>> len(src), src.get(np.array([2, 0]))[1].tolist()
    (3, [2, 0])
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise DataError(f'{len(images)} images but {len(labels)} labels.')
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> tuple[Any, np.ndarray]:
    return self.images[indices], self.labels[indices]


class TfdsSource:
  """Random access to a TFDS ``data_source`` (array_record), decoded per read.

  Images may have different sizes (ImageNet): ``get`` returns a list of them.
  """

  def __init__(self, source: Any, num_workers: int = 8):
    self.source = source
    self.num_workers = num_workers

  def __len__(self) -> int:
    return len(self.source)

  def _read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    keys = [int(i) for i in indices]
    getitems = getattr(self.source, '__getitems__', None)
    if getitems is not None:
      try:
        return list(getitems(keys))
      except TypeError:  # some sources (e.g. TFDS mocks) lack batched reads
        pass
    return [self.source[k] for k in keys]

  def get(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    records = self._read(indices)
    images = [np.asarray(r['image']) for r in records]
    labels = np.asarray([int(r['label']) for r in records], np.int32)
    return images, labels


# ----------------------------------------------------------------------------
# MNIST from IDX files.


def _find_idx_file(data_dir: str, name: str) -> str:
  candidates = [name, name.replace('-idx', '.idx')]
  for c in candidates:
    for suffix in ('', '.gz'):
      path = os.path.join(data_dir, c + suffix)
      if os.path.isfile(path):
        return path
  raise DataError(
      f'MNIST file {name}[.gz] not found in {data_dir!r}. Fetch MNIST with '
      f'`python -m experiments.fetch_data mnist --data_dir {data_dir}`, or '
      'point --config.dataset.data_dir at a directory of MNIST-format IDX '
      'files (train-images-idx3-ubyte, train-labels-idx1-ubyte, '
      't10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, raw or .gz).')


def mnist_split_paths(data_dir: str, split: str) -> dict[str, str]:
  """``{canonical MNIST file name: path found}`` of one split's two files.

  Raises:
    DataError: unknown split or a missing file.
  """
  if split not in MNIST_FILES:
    raise DataError(f'MNIST split {split!r} unknown; use one of '
                    f'{sorted(MNIST_FILES)}.')
  return {n: _find_idx_file(data_dir, n) for n in MNIST_FILES[split]}


def verify_mnist_files(data_dir: str, splits: Sequence[str]) -> bool:
  """Whether the files of ``splits`` in ``data_dir`` are MNIST's own.

  Uses the verified stamp of :mod:`experiments.integrity` (no hashing when
  the files are unchanged since they were verified).

  Returns:
    True for the MNIST files; False for another dataset in MNIST's format
    (no file is MNIST's and none was ever verified as MNIST).

  Raises:
    DataError: a file verified as MNIST before has changed since, or some
      files are MNIST's and others differ (a corrupt copy).
  """
  paths = {}
  for split in splits:
    paths.update(mnist_split_paths(data_dir, split))
  try:
    return integrity.verify_known_files(data_dir, paths,
                                        integrity.MNIST_SHA256, 'mnist')
  except integrity.ChecksumMismatchError as e:
    raise DataError(str(e)) from e


def load_mnist_split(data_dir: str, split: str) -> ArraySource:
  """Loads one split of an MNIST-format directory of IDX files.

  Any dataset in MNIST's format (e.g. Fashion-MNIST, KMNIST) works the same.

  Args:
    data_dir: directory with ``train-images-idx3-ubyte`` etc. (raw or .gz;
      ``train-images.idx3-ubyte`` style names are accepted too).
    split: ``'train'`` or ``'test'``.

  Returns:
    An :class:`ArraySource` with images ``[N, H, W, 1]`` uint8.

  Raises:
    DataError: a file is missing or the images and labels disagree.
    experiments.idx.IdxFormatError: a file is corrupt.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from experiments.idx import write_idx
    >>> d = tempfile.mkdtemp()
    >>> write_idx(os.path.join(d, 't10k-images-idx3-ubyte'),
    ...           np.zeros((5, 28, 28), np.uint8))
    >>> write_idx(os.path.join(d, 't10k-labels-idx1-ubyte'),
    ...           np.arange(5, dtype=np.uint8))
    >>> load_mnist_split(d, 'test').images.shape
    (5, 28, 28, 1)
  """
  image_path, label_path = mnist_split_paths(data_dir, split).values()
  images = idx_lib.read_idx(image_path)
  labels = idx_lib.read_idx(label_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(f'{image_path}: expected uint8 images [N, H, W], got '
                    f'{images.dtype} {images.shape}.')
  if labels.ndim != 1:
    raise DataError(f'{label_path}: expected labels [N], got shape '
                    f'{labels.shape}.')
  if len(images) != len(labels):
    raise DataError(f'{image_path} has {len(images)} images but '
                    f'{label_path} has {len(labels)} labels.')
  return ArraySource(images[..., None], labels.astype(np.int32))


# ----------------------------------------------------------------------------
# TFDS (never downloads).


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = data_dir or '~/tensorflow_datasets'
  manual = ''
  if name.startswith('imagenet'):
    manual = (' ImageNet cannot be downloaded automatically: put '
              'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
              f'{where}/downloads/manual first.')
  return (f'Prepare it once, on a machine with internet access and '
          f'TensorFlow: `tfds build {name} --file_format=array_record '
          f'--data_dir={where}`.{manual} An existing TFRecord copy converts '
          f'with `tfds convert_format --dataset_dir={where}/{name}/<version> '
          '--out_file_format=array_record`. Then pass '
          f'--config.dataset.tfds_data_dir={where}.')


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def load_tfds_split(name: str, split: str, data_dir: str | None,
                    in_memory: bool, num_workers: int = 8):
  """Opens a prepared TFDS dataset without ever downloading it.

  Uses ``tfds.data_source`` (array_record, no TensorFlow needed). When the
  dataset is stored as TFRecord and TensorFlow is installed, small datasets
  (``in_memory=True``) are read with ``tfds.load`` + ``tfds.as_numpy``.

  Args:
    name: TFDS name, e.g. ``'cifar10'``.
    split: split name, e.g. ``'train'``.
    data_dir: TFDS data directory (``None``: TFDS' default).
    in_memory: decode the whole split into an :class:`ArraySource`.
    num_workers: reader threads for :class:`TfdsSource`.

  Returns:
    An :class:`ArraySource` (``in_memory``) or a :class:`TfdsSource`.

  Raises:
    DataError: the dataset is not prepared, with instructions to prepare it.

  Examples:
    >>> import tensorflow_datasets as tfds
    >>> with tfds.testing.mock_data(num_examples=3,
    ...     policy=tfds.testing.MockPolicy.USE_CODE):
    ...   src = load_tfds_split('cifar10', 'test', None, in_memory=True)
    >>> src.images.shape
    (3, 32, 32, 3)
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
  except NotImplementedError as e:  # prepared as TFRecord (or not at all)
    if in_memory and _tensorflow_available():
      try:
        arrays = tfds.as_numpy(tfds.load(
            name, split=split, data_dir=data_dir, download=False,
            batch_size=-1))
      except Exception as e2:  # pylint: disable=broad-except
        raise DataError(f'TFDS dataset {name!r} (split {split!r}) is not '
                        f'available: {e2}. {_prepare_hint(name, data_dir)}'
                        ) from e2
      return ArraySource(np.asarray(arrays['image'], np.uint8),
                         np.asarray(arrays['label'], np.int32))
    raise DataError(f'TFDS dataset {name!r} (split {split!r}) was not found '
                    'as array_record data in '
                    f'{data_dir or "the default TFDS data_dir"}. '
                    f'{_prepare_hint(name, data_dir)}') from e
  except (KeyError, FileNotFoundError, ValueError, AssertionError) as e:
    raise DataError(f'TFDS dataset {name!r} (split {split!r}) is not '
                    f'available ({type(e).__name__}: {e}). '
                    f'{_prepare_hint(name, data_dir)}') from e
  src = TfdsSource(source, num_workers=num_workers)
  if not in_memory:
    return src
  images, labels = [], []
  chunk = 1024
  for start in range(0, len(src), chunk):
    imgs, labs = src.get(np.arange(start, min(start + chunk, len(src))))
    images.extend(imgs)
    labels.append(labs)
  return ArraySource(np.stack(images).astype(np.uint8),
                     np.concatenate(labels))


# ----------------------------------------------------------------------------
# Transforms: (images, labels, rng, positions) -> uint8 [b, H, W, C] batch.
#
# ``rng`` is the generator of the whole global batch; ``positions`` are the
# rows of the global batch this process holds (so randomness is drawn for the
# full global batch and sliced, independent of the number of processes).

Transform = Callable[[Any, np.random.Generator, int, slice], np.ndarray]


def identity_transform(images, rng, global_size, rows):
  """No augmentation; images must already have their final size.

  Examples:
    >>> import numpy as np
    >>> x = np.ones((2, 3, 3, 1), np.uint8)
    >>> identity_transform(x, None, 2, slice(0, 2)).shape
    (2, 3, 3, 1)
  """
  del rng, global_size, rows
  return np.asarray(images, np.uint8)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads ``[N, H, W, C]`` images symmetrically to ``size x size``.

  Examples:
    >>> import numpy as np
    >>> pad_to(np.ones((1, 28, 28, 1), np.uint8), 32).shape
    (1, 32, 32, 1)
  """
  h, w = images.shape[1:3]
  if h == size and w == size:
    return images
  if h > size or w > size:
    raise DataError(f'images of {h}x{w} are larger than image_size={size}.')
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top),
                         (left, size - w - left), (0, 0)))


def make_pad_transform(size: int) -> Transform:
  """Deterministic zero padding (MNIST 28 -> 32 for LeNet-5)."""
  def transform(images, rng, global_size, rows):
    del rng, global_size, rows
    return pad_to(np.asarray(images, np.uint8), size)
  return transform


def make_crop_flip_transform(pad: int, flip: bool = True) -> Transform:
  """Random crop after ``pad`` pixels of zero padding, plus horizontal flip.

  The CIFAR recipe (official code: ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``).

  Examples:
    >>> import numpy as np
    >>> t = make_crop_flip_transform(4)
    >>> x = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    >>> t(x, np.random.default_rng(0), 2, slice(0, 2)).shape
    (2, 8, 8, 3)
  """
  def transform(images, rng, global_size, rows):
    images = np.asarray(images, np.uint8)
    n, h, w, _ = images.shape
    offsets = rng.integers(0, 2 * pad + 1, size=(global_size, 2))[rows]
    flips = (rng.random(global_size) < 0.5)[rows] if flip else np.zeros(n,
                                                                        bool)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    for j in range(n):
      dy, dx = offsets[j]
      crop = padded[j, dy:dy + h, dx:dx + w]
      out[j] = crop[:, ::-1] if flips[j] else crop
    return out
  return transform


def _resize(image: np.ndarray, box: tuple[float, float, float, float],
            size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of the ``box`` (x0, y0, x1, y1) region to ``size``."""
  pil = Image.fromarray(image)
  return np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR, box=box))


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10):
  """The Inception crop: area fraction in ``scale``, aspect in ``ratio``.

  Falls back to the largest centre crop within ``ratio`` after ``attempts``.

  Examples:
    >>> import numpy as np
    >>> x0, y0, x1, y1 = random_resized_crop_box(100, 80,
    ...                                          np.random.default_rng(0))
    >>> 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 100
    True
  """
  area = h * w
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y0 = int(rng.integers(0, h - ch + 1))
      x0 = int(rng.integers(0, w - cw + 1))
      return x0, y0, x0 + cw, y0 + ch
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  y0, x0 = (h - ch) // 2, (w - cw) // 2
  return x0, y0, x0 + cw, y0 + ch


def center_crop_box(h: int, w: int, resize: int, crop: int):
  """Box of the centre ``crop`` after resizing the shorter side to ``resize``.

  Expressed in original pixel coordinates, so resize+crop is one resample.

  Examples:
    >>> center_crop_box(256, 512, 256, 224)
    (144.0, 16.0, 368.0, 240.0)
  """
  scale = resize / min(h, w)
  size = crop / scale
  y0 = (h - size) / 2
  x0 = (w - size) / 2
  return x0, y0, x0 + size, y0 + size


def _thread_map(fn, items, num_workers):
  if num_workers <= 1 or len(items) <= 1:
    return [fn(i) for i in items]
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    return list(pool.map(fn, items))


def make_inception_transform(size: int, flip: bool = True,
                             num_workers: int = 8) -> Transform:
  """ImageNet training: random resized crop to ``size`` + horizontal flip.

  Each example draws from its own generator, seeded by the batch generator
  for every row of the global batch, so rows do not depend on the process.
  """
  def transform(images, rng, global_size, rows):
    seeds = rng.integers(0, 2**63 - 1, size=global_size)[rows]
    flips = (rng.random(global_size) < 0.5)[rows]

    def one(j):
      img = images[j]
      if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
      r = np.random.default_rng(int(seeds[j]))
      box = random_resized_crop_box(img.shape[0], img.shape[1], r)
      out = _resize(img, box, (size, size))
      return out[:, ::-1] if (flip and flips[j]) else out
    return np.stack(_thread_map(one, list(range(len(images))), num_workers))
  return transform


def make_center_crop_transform(resize: int, size: int,
                               num_workers: int = 8) -> Transform:
  """ImageNet evaluation: resize shorter side to ``resize``, centre crop."""
  def transform(images, rng, global_size, rows):
    del rng, global_size, rows

    def one(img):
      if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
      box = center_crop_box(img.shape[0], img.shape[1], resize, size)
      return _resize(img, box, (size, size))
    return np.stack(_thread_map(one, list(images), num_workers))
  return transform


# ----------------------------------------------------------------------------
# Streams.


def _process_rows(global_size: int, process_index: int,
                  process_count: int) -> slice:
  if global_size % process_count:
    raise DataError(f'global batch {global_size} is not divisible by '
                    f'{process_count} processes.')
  per = global_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


class TrainStream:
  """Training batches as a pure function of the global step.

  Args:
    source: an :class:`ArraySource` or :class:`TfdsSource`.
    global_batch_size: examples per step over all processes.
    seed: data seed.
    transform: augmentation (see the ``make_*_transform`` factories).
    rows: this process's rows of each global batch (default: all).
    prefetch: batches prepared ahead by a background thread in ``iterate``.
  """

  def __init__(self, source, global_batch_size: int, seed: int,
               transform: Transform, rows: slice | None = None,
               prefetch: int = 2):
    self.source = source
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.transform = transform
    self.rows = rows if rows is not None else slice(0, global_batch_size)
    self.prefetch = prefetch
    self.steps_per_epoch = len(source) // global_batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f'the training set has {len(source)} examples, fewer '
                      f'than one global batch of {global_batch_size}.')
    self._perm_epoch, self._perm = None, None
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch`` (cached for the current epoch)."""
    with self._lock:
      if self._perm_epoch != epoch:
        self._perm = np.random.default_rng([self.seed, epoch]).permutation(
            len(self.source))
        self._perm_epoch = epoch
      return self._perm

  def global_indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    b = self.global_batch_size
    return self.permutation(epoch)[i * b:(i + 1) * b]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch ``step``."""
    epoch, i = divmod(step, self.steps_per_epoch)
    indices = self.global_indices(step)[self.rows]
    images, labels = self.source.get(indices)
    rng = np.random.default_rng([self.seed, epoch, i, 1])
    images = self.transform(images, rng, self.global_batch_size, self.rows)
    return {'image': images, 'label': labels}

  def iterate(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    """Yields batches ``start .. stop-1``, prepared by a background thread."""
    if self.prefetch <= 0:
      for step in range(start, stop):
        yield self.batch(step)
      return
    q: queue.Queue = queue.Queue(maxsize=self.prefetch)
    stop_event = threading.Event()

    def producer():
      try:
        for step in range(start, stop):
          item = self.batch(step)
          while not stop_event.is_set():
            try:
              q.put(('ok', item), timeout=0.1)
              break
            except queue.Full:
              continue
          if stop_event.is_set():
            return
      except BaseException as e:  # pylint: disable=broad-except
        q.put(('error', e))

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
      for _ in range(start, stop):
        kind, item = q.get()
        if kind == 'error':
          raise item
        yield item
    finally:
      stop_event.set()


class EvalStream:
  """Every evaluation example exactly once, in order, padded to full batches.

  Batches carry ``mask`` (True for real examples); padding rows repeat
  example 0 and must be ignored by the metrics.
  """

  def __init__(self, source, global_batch_size: int, transform: Transform,
               rows: slice | None = None):
    self.source = source
    self.global_batch_size = global_batch_size
    self.transform = transform
    self.rows = rows if rows is not None else slice(0, global_batch_size)
    self.num_examples = len(source)
    self.num_batches = -(-self.num_examples // global_batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    b = self.global_batch_size
    for i in range(self.num_batches):
      idx = np.arange(i * b, (i + 1) * b)
      mask = idx < self.num_examples
      idx = np.where(mask, idx, 0)[self.rows]
      images, labels = self.source.get(idx)
      images = self.transform(images, None, b, self.rows)
      yield {'image': images, 'label': labels, 'mask': mask[self.rows]}


# ----------------------------------------------------------------------------
# Building the datasets of a config.


@dataclasses.dataclass
class Datasets:
  """What the training loop needs from the data."""
  train: TrainStream
  eval: EvalStream
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str = ''  # what the data is: 'mnist' (verified), 'idx', 'cifar10', ..
  verified: bool = False  # the files' checksums are the known dataset's


def pixel_mean_std(images: np.ndarray, chunk: int = 8192
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of ``uint8`` images in [0, 1].

  Computed exactly (integer sums), chunk by chunk.

  Examples:
    >>> import numpy as np
    >>> x = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)
    >>> pixel_mean_std(x)
    ((0.5,), (0.5,))
  """
  images = np.asarray(images)
  channels = images.shape[-1]
  total = np.zeros(channels, np.int64)
  total_sq = np.zeros(channels, np.int64)
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk].reshape(-1, channels).astype(np.int64)
    total += x.sum(0)
    total_sq += (x * x).sum(0)
  n = images.size // channels
  mean = total / n
  var = total_sq / n - mean * mean
  return (tuple(float(m / 255.0) for m in mean),
          tuple(float(np.sqrt(max(v, 0.0)) / 255.0) for v in var))


def _normalization(c, default, train_src, channels: int, what: str):
  """``(mean, std)``: the config's, the dataset's, or the training set's."""
  mean, std = c.get('mean', None), c.get('std', None)
  if (mean is None) != (std is None):
    raise DataError('set both dataset.mean and dataset.std or neither; got '
                    f'mean={mean!r}, std={std!r}.')
  if mean is None:
    if default is not None:
      return tuple(default[0]), tuple(default[1])
    if not isinstance(train_src, ArraySource):
      raise DataError(f'{what}: set dataset.mean and dataset.std (not '
                      'computed for datasets read from disk per batch).')
    return pixel_mean_std(train_src.images)
  mean = tuple(float(m) for m in np.atleast_1d(mean))
  std = tuple(float(v) for v in np.atleast_1d(std))
  for key, value in (('mean', mean), ('std', std)):
    if len(value) != channels or not all(np.isfinite(value)):
      raise DataError(f'dataset.{key}={value!r}: need {channels} finite '
                      f'value(s), one per channel of {what}.')
  if min(std) <= 0:
    raise DataError(f'dataset.std={std!r}: every value must be > 0.')
  return mean, std


def _check_labels(labels: np.ndarray, num_classes: int, what: str):
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f'{what}: labels span [{labels.min()}, {labels.max()}] '
                    f'but dataset.num_classes={num_classes}.')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a step needs to know of a dataset without reading it."""
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


#: The known datasets' channels and normalisation statistics.
_CHANNELS = {'mnist': 1}  # every other dataset of the configs is RGB
_STATS = {'mnist': (MNIST_MEAN, MNIST_STD),
          'cifar10': (CIFAR_MEAN, CIFAR_STD),
          'cifar100': (CIFAR_MEAN, CIFAR_STD),
          'imagenet2012': (IMAGENET_MEAN, IMAGENET_STD)}


def dataset_spec(dataset_config) -> DatasetSpec:
  """The shapes and normalisation of ``config.dataset``, reading no file.

  The image is ``image_size`` square with the dataset's channels; the
  statistics are the config's own ``mean`` / ``std`` when both are set, else
  the known dataset's.

  Raises:
    DataError: a dataset name this function does not know.

  Examples:
    >>> import ml_collections
    >>> c = ml_collections.ConfigDict(dict(name='cifar10', image_size=32,
    ...                                    num_classes=10))
    >>> dataset_spec(c).image_shape
    (32, 32, 3)
  """
  name = dataset_config.name
  if name not in _STATS:
    raise DataError(f'dataset.name {name!r}: the shapes of a dataset are '
                    f'known without its files for {sorted(_STATS)}.')
  size = dataset_config.image_size
  mean, std = _STATS[name]
  if (dataset_config.get('mean') is not None and
      dataset_config.get('std') is not None):
    mean, std = tuple(dataset_config.mean), tuple(dataset_config.std)
  return DatasetSpec(image_shape=(size, size, _CHANNELS.get(name, 3)),
                     num_classes=dataset_config.num_classes,
                     mean=tuple(mean), std=tuple(std))


def build_datasets(dataset_config, *, seed: int, global_batch_size: int,
                   eval_batch_size: int, rows: slice | None = None,
                   eval_rows: slice | None = None) -> Datasets:
  """Builds train and eval streams from the ``config.dataset`` section.

  Args:
    dataset_config: ``config.dataset`` (fields ``name``, ``data_dir``,
      ``tfds_data_dir``, ``train_split``, ``eval_split``, ``num_classes``,
      ``image_size``, ``augment``, ``num_workers``, ``prefetch``, and for
      ImageNet ``eval_resize``; ``max_train_examples`` /
      ``max_eval_examples`` truncate the splits when positive).
    seed: data seed.
    global_batch_size: training batch over all processes.
    eval_batch_size: evaluation batch over all processes.
    rows: this process's rows of a global training batch.
    eval_rows: this process's rows of a global evaluation batch.

  Returns:
    A :class:`Datasets`.

  Raises:
    DataError: unknown dataset name, missing or inconsistent data.
  """
  c = dataset_config
  name = c.name
  workers = int(c.get('num_workers', 8))
  verified = False
  if name in ('mnist', 'idx'):
    if name == 'mnist':
      verified = verify_mnist_files(c.data_dir,
                                    sorted({c.train_split, c.eval_split}))
      if not verified:
        logging.warning(
            'The files in %s are not the MNIST files (their sha256 differ): '
            'treated as another dataset in MNIST\'s IDX format (recorded as '
            "dataset.name='idx'), normalised with the training set's mean "
            'and std unless dataset.mean/std are set.', c.data_dir)
    train_src = load_mnist_split(c.data_dir, c.train_split)
    eval_src = load_mnist_split(c.data_dir, c.eval_split)
    size = c.image_size
    for what, src in (('train', train_src), ('eval', eval_src)):
      h, w = src.images.shape[1:3]
      if h > size or w > size:
        raise DataError(f'the {what} images in {c.data_dir} are {h}x{w}, '
                        f'larger than dataset.image_size={size}; set '
                        f'--config.dataset.image_size={max(h, w)} (or more).')
    pad = make_pad_transform(size)
    train_tf, eval_tf = pad, pad
    norm_default = (MNIST_MEAN, MNIST_STD) if verified else None
    channels = 1
    resolved_name = 'mnist' if verified else 'idx'
  elif name in ('cifar10', 'cifar100'):
    train_src = load_tfds_split(name, c.train_split, c.tfds_data_dir,
                                in_memory=True, num_workers=workers)
    eval_src = load_tfds_split(name, c.eval_split, c.tfds_data_dir,
                               in_memory=True, num_workers=workers)
    size = c.image_size
    if train_src.images.shape[1:3] != (size, size):
      raise DataError(f'{name} images are {train_src.images.shape[1:3]}, '
                      f'config dataset.image_size={size}.')
    train_tf = (make_crop_flip_transform(4) if c.augment
                else identity_transform)
    eval_tf = identity_transform
    norm_default = (CIFAR_MEAN, CIFAR_STD)
    channels = 3
    resolved_name = name
  elif name == 'imagenet2012':
    train_src = load_tfds_split(name, c.train_split, c.tfds_data_dir,
                                in_memory=False, num_workers=workers)
    eval_src = load_tfds_split(name, c.eval_split, c.tfds_data_dir,
                               in_memory=False, num_workers=workers)
    size = c.image_size
    train_tf = (make_inception_transform(size, num_workers=workers)
                if c.augment else
                make_center_crop_transform(c.eval_resize, size, workers))
    eval_tf = make_center_crop_transform(c.eval_resize, size, workers)
    norm_default = (IMAGENET_MEAN, IMAGENET_STD)
    channels = 3
    resolved_name = name
  else:
    raise DataError(f'unknown dataset.name {name!r}; use mnist, idx (any '
                    'dataset in MNIST\'s IDX format), cifar10, cifar100 or '
                    'imagenet2012.')
  train_src = _truncate(train_src, c.get('max_train_examples', -1))
  eval_src = _truncate(eval_src, c.get('max_eval_examples', -1))
  if isinstance(train_src, ArraySource):
    _check_labels(train_src.labels, c.num_classes, f'{name} train')
    _check_labels(eval_src.labels, c.num_classes, f'{name} eval')
  mean, std = _normalization(c, norm_default, train_src, channels,
                             f'{resolved_name} in {c.get("data_dir")}')
  train = TrainStream(train_src, global_batch_size, seed, train_tf, rows,
                      prefetch=int(c.get('prefetch', 2)))
  evaluation = EvalStream(eval_src, eval_batch_size, eval_tf, eval_rows)
  return Datasets(train=train, eval=evaluation, num_classes=c.num_classes,
                  image_shape=(size, size, channels), mean=tuple(mean),
                  std=tuple(std), name=resolved_name, verified=verified)


class _Subset:
  """The first ``n`` records of a source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def get(self, indices):
    return self.source.get(indices)


def _truncate(source, n: int):
  if n is None or n <= 0 or n >= len(source):
    return source
  if isinstance(source, ArraySource):
    return ArraySource(source.images[:n], source.labels[:n])
  return _Subset(source, n)

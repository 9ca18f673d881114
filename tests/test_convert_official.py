"""The official-checkpoint converter against the official code's own outputs.

Fixtures (``tests/fixtures/official``, copied from the shared set; see its
README): a ResNet-20 AdderNet state_dict as the official code saves it (a
DataParallel ``.pth``) and as ``.npz``, the ResNet-50 key list with a
deterministic weight recipe and its BatchNorm running statistics, inputs
(NCHW) and the logits the official PyTorch code computed from them in eval
mode. The converted zoo models must reproduce those logits to 1e-4 of the
largest logit.
"""

import functools
import io
import json
import os
import pickle
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import official

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'fixtures', 'official')
R20_PTH = os.path.join(FIXTURES, 'resnet20_official_dataparallel.pth')
R20_NPZ = os.path.join(FIXTURES, 'resnet20_official.npz')
TOL = 1e-4  # max abs error / max abs logit


def _fixture(name):
  return np.load(os.path.join(FIXTURES, name))


def _keys(model):
  with open(os.path.join(FIXTURES, 'official_state_dict_keys.json')) as f:
    return json.load(f)[model]


def _npz_state_dict():
  with np.load(R20_NPZ) as f:
    return {k: f[k] for k in f.files}


def _relative_error(logits, reference):
  return float(np.max(np.abs(np.asarray(logits) - reference))
               / np.max(np.abs(reference)))


@pytest.fixture(scope='module')
def r20_apply():
  """One jitted eval-mode apply, shared by the ResNet-20 tests."""
  cache = {}

  def apply(converted, x_nchw):
    key = (converted.name, converted.kind, converted.num_classes)
    if key not in cache:
      model = converted.model
      cache[key] = jax.jit(
          lambda v, x: model.apply(v, x, train=False))
    return np.asarray(cache[key](converted.variables,
                                 np.transpose(x_nchw, (0, 2, 3, 1))))
  return apply


def _check_r20_logits(converted, apply):
  x = _fixture('resnet20_inputs_nchw.npy')
  reference = _fixture('resnet20_logits.npy')
  logits = apply(converted, x)
  assert logits.shape == tuple(_keys('resnet20')['logits_shape'])
  err = _relative_error(logits, reference)
  assert err < TOL, err


def test_resnet20_npz_reproduces_official_logits(r20_apply):
  converted = official.load_official(R20_NPZ, 'resnet20')
  assert (converted.num_classes, converted.kind) == (10, 'adder')
  _check_r20_logits(converted, r20_apply)


def test_resnet20_pth_with_torch_reproduces_official_logits(r20_apply):
  pytest.importorskip(
      'torch', reason='PyTorch is not installed (optional: pip install '
      'torch==2.13.0, the CPU wheel); the torch-free reader is tested below')
  state_dict = official.load_state_dict(R20_PTH, reader='torch')
  assert all(k.startswith('module.') for k in state_dict)  # DataParallel
  converted = official.convert_state_dict(state_dict, 'resnet20')
  _check_r20_logits(converted, r20_apply)


def test_torch_free_pth_reader_matches_npz():
  """The restricted zip reader gives the .npz tensors, bit for bit."""
  state_dict = official.load_state_dict(R20_PTH, reader='zip')
  expected = _npz_state_dict()
  assert sorted(state_dict) == sorted('module.' + k for k in expected)
  for key, value in expected.items():
    got = state_dict['module.' + key]
    assert got.dtype == value.dtype and got.shape == value.shape, key
    np.testing.assert_array_equal(got, value, err_msg=key)


def test_auto_reader_without_torch_uses_the_zip_reader(monkeypatch):
  monkeypatch.setattr(official, '_torch_available', lambda: False)
  monkeypatch.setattr(official, '_read_with_torch', None)  # never called
  state_dict = official.load_state_dict(R20_PTH)
  np.testing.assert_array_equal(state_dict['module.layer3.2.conv2.adder'],
                                _npz_state_dict()['layer3.2.conv2.adder'])


def test_torch_reader_matches_torch_free_reader():
  torch = pytest.importorskip('torch', reason='PyTorch is not installed')
  raw = torch.load(R20_PTH, map_location='cpu', weights_only=True)
  ours = official.read_torch_zip(R20_PTH)
  assert list(raw) == list(ours)
  for key, tensor in raw.items():
    np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)


def test_torch_free_reader_reads_views_and_dtypes(tmp_path):
  """Strided views, offsets, shared storages and dtypes as torch saves them."""
  torch = pytest.importorskip('torch', reason='PyTorch is not installed')
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  tensors = {'t': base.t(), 'slice': base[1:, 2:5], 'same': base,
             'half': torch.linspace(-1, 1, 5).half(),
             'bf16': torch.linspace(-1, 1, 5).bfloat16(),
             'int': torch.tensor([3, -4], dtype=torch.int64),
             'bool': torch.tensor([True, False]), 'scalar': torch.tensor(7)}
  path = str(tmp_path / 'views.pth')
  torch.save(tensors, path)
  ours = official.read_torch_zip(path)
  for key, tensor in tensors.items():
    want = (tensor.float() if key == 'bf16' else tensor).numpy()
    got = ours[key]
    assert got.shape == want.shape and got.dtype == want.dtype, key
    np.testing.assert_array_equal(got, want, err_msg=key)


class _Evil:
  def __reduce__(self):
    return (os.getcwd, ())


def test_torch_free_reader_refuses_other_globals(tmp_path):
  path = str(tmp_path / 'evil.pth')
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'w': _Evil()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError,
                     match=r'global (posix|os|nt)\.getcwd'):
    official.read_torch_zip(path)


def test_legacy_pth_without_torch_is_refused_clearly(tmp_path):
  path = str(tmp_path / 'legacy.pth')
  with open(path, 'wb') as f:
    f.write(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2))  # legacy magic
  with pytest.raises(ValueError, match=r"not a zip-format.*reader='torch'"):
    official.load_state_dict(path, reader='zip')


def test_safetensors_reader(tmp_path):
  """A file laid out per the safetensors spec (header size, JSON, data)."""
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
            'b': np.array([1, -2], np.int64)}
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name, dt in (('a', 'F32'), ('b', 'I64')):
    raw = arrays[name].astype(arrays[name].dtype.newbyteorder('<')).tobytes()
    header[name] = {'dtype': dt, 'shape': list(arrays[name].shape),
                    'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  path = str(tmp_path / 'w.safetensors')
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little') + text + b''.join(blobs))
  loaded = official.load_state_dict(path)
  assert sorted(loaded) == ['a', 'b']
  for name, value in arrays.items():
    np.testing.assert_array_equal(loaded[name], value)
    assert loaded[name].dtype == value.dtype


def _recipe(key, shape):
  """The fixture README's deterministic ResNet-50 weights."""
  n = int(np.prod(shape))
  i = np.arange(n, dtype=np.float64)
  phase = (zlib.crc32(key.encode()) % 1000) / 100.0
  if key.endswith('num_batches_tracked'):
    return np.zeros(shape, np.int64)
  if key.endswith('.bias'):
    value = 0.1 * np.cos(0.37 * i + phase)
  elif key.endswith('.weight') and len(shape) == 1:
    value = 1 + 0.1 * np.sin(0.37 * i + phase)
  else:
    value = 0.2 * np.sin(0.37 * i + phase)
  return value.reshape(shape).astype(np.float32)


def test_resnet50_reproduces_official_logits():
  stats = _fixture('resnet50_bn_running_stats.npz')
  keys = _keys('resnet50')
  state_dict = {k: stats[k] if k in stats.files else _recipe(k, tuple(s))
                for k, s in keys['keys'].items()}
  assert set(stats.files) <= set(state_dict)
  converted = official.convert_state_dict(state_dict, 'resnet50')
  assert converted.num_classes == 1000
  assert converted.model.classifier_bias  # the official 1x1 conv has one
  x = _fixture('resnet50_inputs_nchw.npy')
  reference = _fixture('resnet50_logits.npy')
  logits = jax.jit(lambda v, x: converted.model.apply(v, x, train=False))(
      converted.variables, np.transpose(x, (0, 2, 3, 1)))
  assert logits.shape == tuple(keys['logits_shape'])
  err = _relative_error(logits, reference)
  assert err < TOL, err


@pytest.mark.parametrize('model', ['resnet20', 'resnet50'])
def test_expected_keys_are_the_official_ones(model):
  keys = _keys(model)
  num_classes = keys['logits_shape'][1]
  expected = official.expected_state_dict_shapes(model,
                                                 num_classes=num_classes)
  assert expected == {k: tuple(s) for k, s in keys['keys'].items()}


def test_layout_mapping_against_the_fixture_tensors():
  """OIHW kernels become HWIO; the fc 1x1 kernel a (C_in, C_out) Dense."""
  sd = _npz_state_dict()
  v = official.convert_state_dict(sd, 'resnet20').variables
  p, s = v['params'], v['batch_stats']
  oihw = sd['layer2.0.conv1.adder']  # (32, 16, 3, 3)
  for o, i, h, w in [(0, 0, 0, 0), (31, 15, 2, 1), (5, 7, 1, 2)]:
    assert p['layer2_0']['conv1']['kernel'][h, w, i, o] == oihw[o, i, h, w]
  np.testing.assert_array_equal(p['layer2_0']['downsample_conv']['kernel'],
                                sd['layer2.0.downsample.0.adder'][:, :, 0, 0]
                                .T[None, None])
  np.testing.assert_array_equal(p['fc']['kernel'], sd['fc.weight'][:, :, 0,
                                                                   0].T)
  np.testing.assert_array_equal(p['fc_bn']['scale'], sd['bn2.weight'])
  np.testing.assert_array_equal(s['layer3_2']['bn2']['var'],
                                sd['layer3.2.bn2.running_var'])
  np.testing.assert_array_equal(s['layer3_0']['downsample_bn']['mean'],
                                sd['layer3.0.downsample.1.running_mean'])
  assert 'bias' not in p['fc']


def test_missing_unknown_and_misshaped_keys_are_named():
  sd = _npz_state_dict()
  del sd['layer2.1.bn1.running_var']
  sd['layer4.0.conv1.adder'] = np.zeros((8, 8, 3, 3), np.float32)
  sd['layer1.0.conv2.adder'] = sd['layer1.0.conv2.adder'].transpose(2, 3, 1,
                                                                    0)
  with pytest.raises(official.ConversionError) as info:
    official.convert_state_dict(sd, 'resnet20')
  message = str(info.value)
  assert "1 missing key(s): ['layer2.1.bn1.running_var']" in message
  assert "1 unknown key(s): ['layer4.0.conv1.adder']" in message
  assert ("'layer1.0.conv2.adder': checkpoint (3, 3, 16, 16), expected "
          '(16, 16, 3, 3)') in message
  assert info.value.missing == ['layer2.1.bn1.running_var']
  assert info.value.unknown == ['layer4.0.conv1.adder']
  assert list(info.value.misshaped) == ['layer1.0.conv2.adder']


def test_non_float_weight_is_refused():
  sd = _npz_state_dict()
  sd['bn1.weight'] = sd['bn1.weight'].astype(np.int32)
  with pytest.raises(official.ConversionError,
                     match=r"'bn1.weight': checkpoint \(16,\) int32"):
    official.convert_state_dict(sd, 'resnet20')


def _as_cnn(sd):
  return {k[:-len('adder')] + 'weight' if k.endswith('.adder') else k: v
          for k, v in sd.items()}


def test_cnn_checkpoint_for_adder_model_is_refused():
  with pytest.raises(official.ConversionError,
                     match=r"a CNN checkpoint was given for the adder "
                     r"resnet20.*kind='cnn'"):
    official.convert_state_dict(_as_cnn(_npz_state_dict()), 'resnet20')
  with pytest.raises(official.ConversionError,
                     match=r'an AdderNet checkpoint was given for the CNN'):
    official.convert_state_dict(_npz_state_dict(), 'resnet20', kind='cnn')


def _official_forward(sd, x, adder=True):
  """The official ResNet-20 in numpy (NCHW, OIHW), float64: the oracle.

  As the official code: explicit zero padding that enters the l1 distance
  (``-sum |x - w|`` over unfolded patches), BatchNorm in eval mode (eps
  1e-5), AvgPool2d(8), ``fc`` a 1x1 convolution, ``bn2`` on the logits.
  """
  def layer(x, w, stride, pad, is_adder):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (wd + 2 * pad - kw) // stride + 1
    cols = np.stack([xp[:, :, i:i + stride * ho:stride,
                        j:j + stride * wo:stride]
                     for i in range(kh) for j in range(kw)], axis=2)
    cols = cols.reshape(n, c * kh * kw, ho, wo)
    wf = w.reshape(o, -1).astype(np.float64)
    if not is_adder:
      return np.einsum('nkhw,ok->nohw', cols, wf)
    return -np.abs(cols[:, None] - wf[None, :, :, None, None]).sum(2)

  def bn(x, name):
    g, b, m, v = (sd[f'{name}.{k}'].astype(np.float64) for k in
                  ('weight', 'bias', 'running_mean', 'running_var'))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + 1e-5)
            * g.reshape(shape) + b.reshape(shape))

  body = 'adder' if adder else 'weight'
  relu = functools.partial(np.maximum, 0.0)
  stem = layer(x.astype(np.float64), sd['conv1.weight'], 1, 1, False)
  y = relu(bn(stem, 'bn1'))
  for stage in (1, 2, 3):
    for block in (0, 1, 2):
      p = f'layer{stage}.{block}'
      down = f'{p}.downsample.0.{body}' in sd
      s = 2 if down and stage > 1 else 1
      out = relu(bn(layer(y, sd[f'{p}.conv1.{body}'], s, 1, adder),
                    f'{p}.bn1'))
      out = bn(layer(out, sd[f'{p}.conv2.{body}'], 1, 1, adder), f'{p}.bn2')
      res = (bn(layer(y, sd[f'{p}.downsample.0.{body}'], s, 0, adder),
                f'{p}.downsample.1') if down else y)
      y = relu(out + res)
  y = y.mean(axis=(2, 3), keepdims=True)  # AvgPool2d(8) on 8x8
  y = np.einsum('nchw,oc->no', y, sd['fc.weight'][:, :, 0, 0].astype(
      np.float64))
  return bn(y, 'bn2')


def test_numpy_oracle_reproduces_official_logits():
  """The oracle below is right: it gives the official code's logits."""
  logits = _official_forward(_npz_state_dict(),
                             _fixture('resnet20_inputs_nchw.npy'))
  assert _relative_error(logits, _fixture('resnet20_logits.npy')) < 1e-5


def test_cnn_twin_matches_the_numpy_oracle(r20_apply):
  """The CNN twin (keys ``weight``) converts to ``nn.Conv`` layers."""
  sd = _as_cnn(_npz_state_dict())
  converted = official.convert_state_dict(sd, 'resnet20', kind='cnn')
  layer = converted.model.conv
  assert getattr(layer, 'func', layer).__name__ == 'Conv'
  np.testing.assert_array_equal(
      converted.variables['params']['layer1_1']['conv2']['kernel'],
      sd['layer1.1.conv2.weight'].transpose(2, 3, 1, 0))
  x = _fixture('resnet20_inputs_nchw.npy')
  reference = _official_forward(sd, x, adder=False)
  err = _relative_error(r20_apply(converted, x), reference)
  assert err < TOL, err


def test_class_count_is_read_from_the_checkpoint():
  """A CIFAR-100 ResNet-20: the head and its BatchNorm have 100 outputs."""
  sd = _npz_state_dict()
  rng = np.random.default_rng(0)
  sd['fc.weight'] = rng.normal(size=(100, 64, 1, 1)).astype(np.float32)
  for name in ('weight', 'bias', 'running_mean'):
    sd[f'bn2.{name}'] = rng.normal(size=100).astype(np.float32)
  sd['bn2.running_var'] = rng.uniform(0.5, 2, size=100).astype(np.float32)
  converted = official.convert_state_dict(sd, 'resnet20')
  assert converted.num_classes == 100 and converted.model.num_classes == 100
  assert converted.variables['params']['fc']['kernel'].shape == (64, 100)
  out = jax.eval_shape(lambda v: converted.model.apply(
      v, jnp.zeros((2, 32, 32, 3)), train=False), converted.variables)
  assert out.shape == (2, 100)


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"got 'resnet18'"):
    official.convert_state_dict({}, 'resnet18')
  with pytest.raises(ValueError, match=r"got 'bnn'"):
    official.convert_state_dict({}, 'resnet20', kind='bnn')
  with pytest.raises(ValueError, match=r"may not set \['classifier_bias'\]"):
    official.convert_state_dict({}, 'resnet20', classifier_bias=True)
  with pytest.raises(official.ConversionError, match=r"no usable 'fc.weight'"):
    official.convert_state_dict({'bn1.weight': np.ones(16)}, 'resnet20')
  with pytest.raises(ValueError, match=r"unknown suffix '.ckpt'"):
    path = tmp_path / 'w.ckpt'
    path.write_bytes(b'')
    official.load_state_dict(str(path))
  with pytest.raises(ValueError, match=r"reader must be .* got 'pickle'"):
    official.load_state_dict(R20_PTH, reader='pickle')
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    official.load_state_dict(str(tmp_path / 'nope.pth'))


def test_official_normalisation_is_the_pipelines():
  """experiments.data normalises as the official code (issue 16's values)."""
  from experiments import data  # pylint: disable=g-import-not-at-top
  assert official.CIFAR_MEAN == data.CIFAR_MEAN == (0.4914, 0.4822, 0.4465)
  assert official.CIFAR_STD == data.CIFAR_STD == (0.2023, 0.1994, 0.2010)
  assert official.IMAGENET_MEAN == data.IMAGENET_MEAN
  assert official.IMAGENET_STD == data.IMAGENET_STD


def test_state_dict_from_a_buffer_of_torch_tensors():
  """convert_state_dict takes torch tensors directly (torch.load output)."""
  torch = pytest.importorskip('torch', reason='PyTorch is not installed')
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(v) for k, v in _npz_state_dict().items()},
             buffer)
  buffer.seek(0)
  sd = torch.load(buffer, weights_only=True)
  converted = official.convert_state_dict(sd, 'resnet20')
  np.testing.assert_array_equal(
      converted.variables['params']['conv1']['kernel'],
      sd['conv1.weight'].numpy().transpose(2, 3, 1, 0))

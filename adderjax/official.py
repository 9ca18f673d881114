"""The official pretrained AdderNets: read their checkpoints, convert them.

The paper's official PyTorch code (huawei-noah/AdderNet) ships ResNet-20
(CIFAR-10, 91.8 %) and ResNet-50 (ImageNet, 74.9 % top-1) checkpoints. Their
format, which :func:`convert_state_dict` reads strictly:

* a PyTorch ``state_dict`` (names to tensors), usually saved from
  ``nn.DataParallel``, so every name starts with ``module.`` (removed here);
* adder layers store their kernel as ``<layer>.adder`` (OIHW, no bias),
  convolutions as ``<layer>.weight`` (OIHW); the CNN twins of the same
  architectures store every layer as ``weight``;
* a BatchNorm2d (``weight``, ``bias``, ``running_mean``, ``running_var``,
  ``num_batches_tracked``; eps 1e-5) after every layer;
* the head is a 1x1 convolution ``fc`` (with a bias in ResNet-50) followed by
  a BatchNorm2d ``bn2`` on the logits;
* inputs are NCHW, normalised with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`
  (CIFAR) or, after resizing to 256 and centre-cropping 224,
  :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

The zoo's ResNets (:mod:`adderjax.models.resnet`) have the official topology,
so a checkpoint maps onto them name by name: kernels go from OIHW to Flax's
HWIO (``(*kernel_size, C_in, C_out)``), the ``fc`` 1x1 kernel becomes a
``Dense`` kernel ``(C_in, C_out)``, and BatchNorm's ``weight`` / ``bias`` /
``running_mean`` / ``running_var`` become ``scale`` / ``bias`` / ``mean`` /
``var``. Like the official adder layer, the zoo's zero-pads and lets the
padded zeros enter the l1 distance, so the converted model computes the
official logits (tested to 1e-4 of the largest logit on fixtures made by the
official code).

Checkpoint files (:func:`load_state_dict`): ``.pth`` through PyTorch
(``torch.load(..., weights_only=True)``) when it is installed, else through a
torch-free reader of the zip format (:func:`read_torch_zip`: a restricted
unpickler that allows only the globals that rebuild tensors, like
``weights_only``); ``.npz`` and ``.safetensors`` need neither.

Examples:
  >>> import numpy as np
  >>> from adderjax import official
  >>> shapes = official.expected_state_dict_shapes('resnet20', num_classes=10)
  >>> shapes['layer1.0.conv1.adder'], shapes['fc.weight']
  ((16, 16, 3, 3), (10, 64, 1, 1))
  >>> state_dict = {'module.' + k: np.zeros(s, np.float32)
  ...               for k, s in shapes.items()}
  >>> model, variables = official.convert_state_dict(state_dict, 'resnet20')[:2]
  >>> variables['params']['layer1_0']['conv1']['kernel'].shape  # HWIO
  (3, 3, 16, 16)
  >>> model.num_classes
  10

References:
  Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
  Learning?", CVPR 2020, https://arxiv.org/abs/1912.13200; official code:
  https://github.com/huawei-noah/AdderNet
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from adderjax import models as models_lib

#: The official architectures :func:`convert_state_dict` reads.
OFFICIAL_MODELS = ('resnet20', 'resnet50')
#: Layer kinds a checkpoint may hold: AdderNet or its CNN twin.
CONVERT_KINDS = ('adder', 'cnn')

#: CIFAR normalisation of the official code (on [0, 1] pixels).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
#: The standard deviations of the CIFAR normalisation (see :data:`CIFAR_MEAN`).
CIFAR_STD = (0.2023, 0.1994, 0.2010)
#: ImageNet normalisation of the official code (after resize 256, crop 224).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: The standard deviations of the ImageNet normalisation (see
#: :data:`IMAGENET_MEAN`).
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture facts the checkpoint does not say: the head's bias.
_CLASSIFIER_BIAS = {'resnet20': False, 'resnet50': True}
_DATA_PARALLEL_PREFIX = 'module.'
_BODY_KEY = re.compile(
    r'^layer\d+\.\d+\.(conv\d+|downsample\.0)\.(adder|weight)$')
_MAX_LISTED = 12


class ConversionError(ValueError):
  """A checkpoint that does not fit the model, with the keys at fault.

  Attributes:
    missing: keys the model needs that the checkpoint lacks.
    unknown: keys of the checkpoint the model has no place for.
    misshaped: ``{key: (checkpoint shape, expected shape)}``.
  """

  def __init__(self, message: str, missing=(), unknown=(), misshaped=None):
    super().__init__(message)
    self.missing = list(missing)
    self.unknown = list(unknown)
    self.misshaped = dict(misshaped or {})


class ConvertedModel(NamedTuple):
  """A converted checkpoint: the zoo model and its variables.

  Attributes:
    model: the unbound zoo model (``adderjax.models.create_model``).
    variables: ``{'params': ..., 'batch_stats': ...}`` of float32 numpy
      arrays, for ``model.apply(variables, x_nhwc, train=False)``.
    name: the zoo model name.
    kind: ``'adder'`` or ``'cnn'``.
    num_classes: the class count read from the checkpoint.
  """
  model: nn.Module
  variables: dict[str, Any]
  name: str
  kind: str
  num_classes: int


# ----------------------------------------------------------------------------
# Reading checkpoint files.


def load_state_dict(path: str, *,
                    reader: str = 'auto') -> dict[str, np.ndarray]:
  """Reads a checkpoint file as ``{name: numpy array}`` (names unchanged).

  Args:
    path: a ``.pth`` / ``.pt`` (PyTorch), ``.npz`` or ``.safetensors`` file.
    reader: for PyTorch files: ``'torch'`` (``torch.load`` with
      ``weights_only=True``; needs PyTorch), ``'zip'`` (:func:`read_torch_zip`,
      no PyTorch; zip-format files, i.e. saved by PyTorch >= 1.6) or
      ``'auto'`` (torch when importable, else zip).

  Returns:
    The state dict, as numpy arrays.

  Raises:
    FileNotFoundError: no such file.
    ValueError: an unknown suffix or reader, a file that is not a state
      dict (names to tensors), or one that is not a valid checkpoint (empty,
      truncated, corrupt, or of another format): the message names the file.
    ImportError: ``reader='torch'`` without PyTorch.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), 'w.npz')
    >>> np.savez(path, **{'fc.weight': np.ones((2, 3, 1, 1), np.float32)})
    >>> load_state_dict(path)['fc.weight'].shape
    (2, 3, 1, 1)
  """
  if reader not in ('auto', 'torch', 'zip'):
    raise ValueError(f"reader must be 'auto', 'torch' or 'zip', got "
                     f'{reader!r}.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint {path!r} not found.')
  suffix = os.path.splitext(path)[1].lower()
  formats = {'.npz': 'NumPy .npz', '.safetensors': 'safetensors',
             '.pth': 'PyTorch', '.pt': 'PyTorch', '.bin': 'PyTorch',
             '.tar': 'PyTorch'}
  if suffix not in formats:
    raise ValueError(f'checkpoint {path!r}: unknown suffix {suffix!r}; use '
                     '.pth/.pt (PyTorch), .npz or .safetensors.')
  if os.path.getsize(path) == 0:
    raise ValueError(f'{path!r} is not a valid {formats[suffix]} checkpoint: '
                     'the file is empty (0 bytes).')
  if suffix == '.npz':
    return _read_npz(path)
  if suffix == '.safetensors':
    return read_safetensors(path)
  if reader == 'auto':
    reader = 'torch' if _torch_available() else 'zip'
  try:
    if reader == 'torch':
      return _read_with_torch(path)
    return read_torch_zip(path)
  except (zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise _not_valid(path, 'PyTorch', e) from None


def _not_valid(path: str, fmt: str, cause: BaseException,
               reason: str = '') -> ValueError:
  """The error of a checkpoint file that cannot be read (corrupt, cut)."""
  if not reason:
    first = str(cause).strip().splitlines()
    first = first[0].split('. ')[0].rstrip('.') if first else ''
    reason = (f'{type(cause).__name__}: {first}' if first
              else type(cause).__name__)
  return ValueError(f'{path!r} is not a valid {fmt} checkpoint (truncated or '
                    f'corrupt?): {reason}.')


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """An ``.npz`` archive as ``{name: array}``; pickled data never loaded."""
  try:
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise _not_valid(path, 'NumPy .npz', None,
                       'it holds a single .npy array, not a zip archive '
                       'of named arrays')
    with f:
      return {k: np.asarray(f[k]) for k in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
    raise _not_valid(path, 'NumPy .npz', e) from None
  except ValueError as e:
    if 'is not a valid' in str(e):
      raise
    if 'pickle' in str(e):  # numpy's advice to allow pickles: never taken
      raise _not_valid(path, 'NumPy .npz', e,
                       'not a zip archive of arrays (numpy would read it as '
                       'pickled data, which is never loaded)') from None
    raise _not_valid(path, 'NumPy .npz', e) from None


def _torch_available() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _read_with_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} with reader='torch' needs PyTorch (pip install "
        "torch); reader='zip' reads zip-format .pth files without it.") from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message advises weights_only=False (running the file's code):
    # never give that advice; keep the line that names the refused global.
    text = str(e)
    detail = text.split('WeightsUnpickler error:', 1)[-1] if (
        'WeightsUnpickler error:' in text) else ''
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    reason = 'torch.load(weights_only=True) could not unpickle it' + (
        f' ({lines[0]})' if lines else '') + (
                  '; only a state_dict of tensors is read (loading with '
                  'weights_only=False would run code from the file)')
    raise _not_valid(path, 'PyTorch', e, reason) from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
    raise _not_valid(path, 'PyTorch', e) from None
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path!r} holds a {type(obj).__name__}, not a '
                     'state_dict (a mapping of names to tensors).')
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f'{path!r}: entry {name!r} is a '
                       f'{type(value).__name__}, not a tensor; pass a '
                       'state_dict.')
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      value = value.float()
    out[str(name)] = value.numpy().copy()
  return out


def _storage_dtypes() -> dict[str, np.dtype]:
  return {
      'DoubleStorage': np.dtype(np.float64),
      'FloatStorage': np.dtype(np.float32),
      'HalfStorage': np.dtype(np.float16),
      'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
      'LongStorage': np.dtype(np.int64),
      'IntStorage': np.dtype(np.int32),
      'ShortStorage': np.dtype(np.int16),
      'CharStorage': np.dtype(np.int8),
      'ByteStorage': np.dtype(np.uint8),
      'BoolStorage': np.dtype(np.bool_),
  }


class _StorageType(NamedTuple):
  dtype: np.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2`` on a flat numpy storage."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f'bad tensor geometry: size {size}, '
                                 f'stride {stride}.')
  if 0 in size:
    return np.zeros(size, np.float32 if storage.dtype.name == 'bfloat16'
                    else storage.dtype)
  last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or last >= storage.size:
    raise pickle.UnpicklingError(
        f'tensor of size {size}, stride {stride} at offset {storage_offset} '
        f'reads past its storage of {storage.size} elements.')
  view = np.lib.stride_tricks.as_strided(
      storage[int(storage_offset):], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  if storage.dtype.name == 'bfloat16':  # as the torch reader: float32
    return np.array(view, np.float32)
  return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict, allowing only tensor-rebuild globals."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self._dtypes = _storage_dtypes()

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in self._dtypes:
      return _StorageType(self._dtypes[name])
    raise pickle.UnpicklingError(
        f'the checkpoint needs the global {module}.{name}, which the '
        'torch-free reader does not allow (only tensor rebuilds and '
        "OrderedDict); read it with PyTorch (reader='torch').")

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}.')
    _, storage_type, key, _, numel = pid
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
  """Reads a zip-format PyTorch state dict without PyTorch.

  The zip holds ``<archive>/data.pkl`` (the pickled dict) and one raw record
  ``<archive>/data/<key>`` per storage. The pickle is read by a restricted
  unpickler that allows only ``collections.OrderedDict``,
  ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` and the
  ``torch.*Storage`` dtype markers, as ``torch.load(weights_only=True)``
  does; any other global is refused, so loading runs no code of the file.

  Args:
    path: a ``.pth`` file written by ``torch.save`` (PyTorch >= 1.6).

  Returns:
    ``{name: numpy array}`` (``bfloat16`` tensors as float32).

  Raises:
    ValueError: not a zip-format checkpoint (e.g. the legacy format of
      PyTorch < 1.6: read it with PyTorch), or not a state dict of tensors.
    pickle.UnpicklingError: a global other than the tensor rebuilds, or a
      malformed tensor.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path!r} is not a valid checkpoint for this reader: '
                     'not a zip-format PyTorch file (truncated or corrupt, or '
                     'a legacy file of PyTorch < 1.6: read that with '
                     "PyTorch, reader='torch').")
  with zipfile.ZipFile(path) as zf:
    pickles = [n for n in zf.namelist() if n.endswith('/data.pkl')
               and n.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{path!r}: expected one <archive>/data.pkl, found '
                       f'{pickles}.')
    prefix = pickles[0][:-len('data.pkl')]
    names = set(zf.namelist())
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = zf.read(prefix + 'byteorder').decode().strip()
    if byteorder not in ('little', 'big'):
      raise ValueError(f'{path!r}: unknown byteorder {byteorder!r}.')
    cache = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        record = f'{prefix}data/{key}'
        if record not in names:
          raise pickle.UnpicklingError(f'{path!r}: storage {record} missing.')
        raw = zf.read(record)
        dt = dtype.newbyteorder('<' if byteorder == 'little' else '>')
        if len(raw) < numel * dt.itemsize:
          raise pickle.UnpicklingError(
              f'{path!r}: storage {record} has {len(raw)} bytes, fewer than '
              f'{numel} x {dt.itemsize}.')
        cache[key] = np.frombuffer(raw, dt, count=numel).astype(dtype)
      return cache[key]

    with zf.open(pickles[0]) as f:
      obj = _RestrictedUnpickler(f, load_storage).load()
  return _check_state_dict(obj, path)


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64,
    'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file as numpy arrays (no extra dependency).

  Format: an 8-byte little-endian header size, a JSON header
  ``{name: {'dtype', 'shape', 'data_offsets': [begin, end]}}``, then the
  little-endian data. ``BF16`` tensors are returned as float32.

  Raises:
    ValueError: a malformed file or an unknown dtype.
  """
  with open(path, 'rb') as f:
    blob = f.read()
  if len(blob) < 8:
    raise ValueError(f'{path!r} is too short for a safetensors file.')
  n = int.from_bytes(blob[:8], 'little')
  if n > len(blob) - 8:
    raise ValueError(f'{path!r}: header of {n} bytes exceeds the file.')
  try:
    header = json.loads(blob[8:8 + n])
  except ValueError as e:
    raise ValueError(f'{path!r}: unreadable safetensors header: {e}') from e
  data = memoryview(blob)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    begin, end = info['data_offsets']
    shape = tuple(info['shape'])
    if info['dtype'] == 'BF16':
      dtype = np.dtype(ml_dtypes.bfloat16)
    elif info['dtype'] in _SAFETENSORS_DTYPES:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
    else:
      raise ValueError(f'{path!r}: tensor {name!r} has unsupported dtype '
                       f"{info['dtype']!r}.")
    if not 0 <= begin <= end <= len(data) or (
        end - begin != int(np.prod(shape)) * dtype.itemsize):
      raise ValueError(f'{path!r}: tensor {name!r} of shape {shape} has bad '
                       f'data offsets {[begin, end]}.')
    arr = np.frombuffer(data[begin:end], dtype).reshape(shape)
    out[name] = arr.astype(np.float32 if info['dtype'] == 'BF16'
                           else arr.dtype.newbyteorder('='))
  return out


def _check_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path!r} holds a {type(obj).__name__}, not a '
                     'state_dict (a mapping of names to tensors).')
  out = {}
  for name, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f'{path!r}: entry {name!r} is a '
                       f'{type(value).__name__}, not a tensor; pass a '
                       'state_dict.')
    out[str(name)] = value
  return out


# ----------------------------------------------------------------------------
# The name and layout mapping.


def _official_module(modules: tuple[str, ...]) -> str:
  parts = []
  for m in modules:
    if m == 'fc_bn':
      parts.append('bn2')
    elif m == 'downsample_conv':
      parts.append('downsample.0')
    elif m == 'downsample_bn':
      parts.append('downsample.1')
    elif re.fullmatch(r'layer\d+_\d+', m):
      parts.append(m.replace('_', '.'))
    else:
      parts.append(m)
  return '.'.join(parts)


_BN_LEAVES = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
              ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}


def _layout(zoo_path: tuple[str, ...], kind: str):
  """The official key of a zoo variable and how its tensor maps onto it.

  Returns ``(key, layout)``, layout ``'oihw'`` (conv kernel), ``'fc'`` (1x1
  conv kernel to Dense kernel) or ``'same'``.
  """
  collection, *modules, leaf = zoo_path
  modules = tuple(modules)
  module = _official_module(modules)
  if collection == 'params' and leaf == 'kernel':
    if modules == ('fc',):
      return f'{module}.weight', 'fc'
    body = modules != ('conv1',)
    return f"{module}.{'adder' if body and kind == 'adder' else 'weight'}", (
        'oihw')
  if collection == 'params' and leaf == 'bias' and modules == ('fc',):
    return f'{module}.bias', 'same'
  if (collection, leaf) in _BN_LEAVES:
    return f'{module}.{_BN_LEAVES[collection, leaf]}', 'same'
  raise ValueError(f'no official name for the zoo variable {zoo_path}.')


def _official_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == 'oihw':
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if layout == 'fc':
    cin, cout = shape
    return (cout, cin, 1, 1)
  return tuple(shape)


def _to_zoo(value: np.ndarray, layout: str) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if layout == 'oihw':
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if layout == 'fc':
    return np.ascontiguousarray(value.reshape(value.shape[:2]).T)
  return value


def _check_name_kind(name: str, kind: str) -> None:
  if name not in OFFICIAL_MODELS:
    raise ValueError(f'model must be one of {OFFICIAL_MODELS} (the official '
                     f'AdderNet architectures), got {name!r}.')
  if kind not in CONVERT_KINDS:
    raise ValueError(f'kind must be one of {CONVERT_KINDS}, got {kind!r}.')


def _build(name: str, kind: str, num_classes: int, overrides: dict[str, Any]):
  """The zoo model and its variables' official keys, layouts and shapes."""
  try:
    key = (name, kind, num_classes, tuple(sorted(overrides.items())))
    hash(key)
  except TypeError:  # an unhashable override: build it afresh
    return _build_uncached(name, kind, num_classes, overrides)
  return _build_cached(key)


@functools.lru_cache(maxsize=16)
def _build_cached(key):
  name, kind, num_classes, overrides = key
  return _build_uncached(name, kind, num_classes, dict(overrides))


def _build_uncached(name: str, kind: str, num_classes: int,
                    overrides: dict[str, Any]):
  model = models_lib.create_model(
      name, kind=kind, num_classes=num_classes,
      classifier_bias=_CLASSIFIER_BIAS[name], **overrides)
  shape = (1,) + models_lib.INPUT_SHAPES[name]
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  plan = {}  # official key -> (zoo path or None, layout, official shape)
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    zoo_path = tuple(p.key for p in path)
    key, layout = _layout(zoo_path, kind)
    plan[key] = (zoo_path, layout, _official_shape(leaf.shape, layout))
    if zoo_path[0] == 'batch_stats' and zoo_path[-1] == 'mean':
      nbt = key[:-len('running_mean')] + 'num_batches_tracked'
      plan[nbt] = (None, 'same', ())
  return model, plan


def expected_state_dict_shapes(name: str, *, num_classes: int,
                               kind: str = 'adder') -> dict[str, tuple]:
  """The official state_dict keys and shapes of a model (no prefix).

  Args:
    name: ``'resnet20'`` or ``'resnet50'``.
    num_classes: the class count.
    kind: ``'adder'`` (body kernels named ``adder``) or ``'cnn'``.

  Returns:
    ``{key: shape}`` in the zoo's variable order.

  Examples:
    >>> shapes = expected_state_dict_shapes('resnet20', num_classes=100)
    >>> len(shapes), shapes['fc.weight'], shapes['bn2.num_batches_tracked']
    (132, (100, 64, 1, 1), ())
  """
  _check_name_kind(name, kind)
  return {k: v[2] for k, v in _build(name, kind, num_classes, {})[1].items()}


def _listing(items, fmt=repr) -> str:
  items = list(items)
  shown = ', '.join(fmt(i) for i in items[:_MAX_LISTED])
  more = (f', ... and {len(items) - _MAX_LISTED} more'
          if len(items) > _MAX_LISTED else '')
  return f'[{shown}{more}]'


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  keys = list(state_dict)
  if keys and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in keys):
    return {k[len(_DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _check_kind_of_checkpoint(keys, name: str, kind: str) -> None:
  body = [k for k in keys if _BODY_KEY.match(k)]
  adder = [k for k in body if k.endswith('.adder')]
  weight = [k for k in body if k.endswith('.weight')]
  if kind == 'adder' and weight and not adder:
    raise ConversionError(
        f"a CNN checkpoint was given for the adder {name}: its body layers "
        f"store 'weight' (e.g. {weight[0]!r}) where an AdderNet's store "
        "'adder'. Convert it with kind='cnn', or pass an AdderNet checkpoint.",
        unknown=weight)
  if kind == 'cnn' and adder and not weight:
    raise ConversionError(
        f"an AdderNet checkpoint was given for the CNN {name}: its body "
        f"layers store 'adder' (e.g. {adder[0]!r}) where a CNN's store "
        "'weight'. Convert it with kind='adder'.", unknown=adder)


def convert_state_dict(state_dict: Mapping[str, Any], name: str = 'resnet20',
                       *, kind: str = 'adder',
                       **model_overrides) -> ConvertedModel:
  """Converts an official state_dict to a zoo model and its variables.

  Strict: every key of the checkpoint is used and every variable of the model
  is filled, with its shape checked; otherwise a :class:`ConversionError`
  lists the missing, unknown and misshaped keys together. The ``module.``
  prefix of ``nn.DataParallel`` checkpoints is removed (when every key has
  it). ``num_batches_tracked`` is checked but not kept.

  Args:
    state_dict: names to arrays (numpy, PyTorch tensors or anything
      ``np.asarray`` takes), e.g. from :func:`load_state_dict`.
    name: the official architecture, ``'resnet20'`` (CIFAR) or ``'resnet50'``
      (ImageNet, whose classifier has a bias).
    kind: ``'adder'`` (AdderNet) or ``'cnn'`` (its CNN twin).
    **model_overrides: other fields of the zoo model, e.g.
      ``implementation='xla'`` or ``dtype=jnp.bfloat16``.

  Returns:
    A :class:`ConvertedModel` ``(model, variables, name, kind, num_classes)``;
    the class count is read from ``fc.weight``.

  Raises:
    ValueError: an unknown ``name`` or ``kind``, or an override of what the
      architecture fixes (``classifier_bias``, ``num_classes``, layers).
    ConversionError: missing, unknown or misshaped keys, a non-float weight,
      a NaN or infinite value or a negative BatchNorm variance (the keys
      named), or a checkpoint of the other kind (CNN for an adder model, or
      back).

  Examples:
    >>> import numpy as np
    >>> shapes = expected_state_dict_shapes('resnet20', num_classes=10)
    >>> sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    >>> sd['fc.weight'] = np.zeros((10, 64), np.float32)
    >>> del sd['bn2.bias']
    >>> convert_state_dict(sd, 'resnet20')
    Traceback (most recent call last):
    ...
    adderjax.official.ConversionError: the checkpoint does not fit the official resnet20 (adder, 10 classes): 1 missing key(s): ['bn2.bias']; 1 misshaped key(s): ['fc.weight': checkpoint (10, 64), expected (10, 64, 1, 1)].
  """
  _check_name_kind(name, kind)
  fixed = sorted(set(model_overrides) & {'classifier_bias', 'num_classes',
                                         'kind', 'conv', 'dense'})
  if fixed:
    raise ValueError(f'model_overrides may not set {fixed}: the official '
                     'architecture and the checkpoint fix them.')
  if not isinstance(state_dict, Mapping):
    raise TypeError(f'state_dict must be a mapping of names to arrays, got '
                    f'{type(state_dict).__name__}.')
  sd = _strip_data_parallel(state_dict)
  sd = {k: _as_numpy(v) for k, v in sd.items()}
  _check_kind_of_checkpoint(sd, name, kind)
  fc = sd.get('fc.weight')
  if fc is None or fc.ndim < 1 or fc.shape[0] < 1:
    raise ConversionError(
        f"the checkpoint has no usable 'fc.weight' (the classifier), so its "
        f'class count is unknown; keys: {_listing(sorted(sd))}.',
        missing=['fc.weight'] if fc is None else [])
  num_classes = int(fc.shape[0])
  model, plan = _build(name, kind, num_classes, model_overrides)

  missing = [k for k in plan if k not in sd]
  unknown = sorted(k for k in sd if k not in plan)
  misshaped = {}
  for key, (zoo_path, _, shape) in plan.items():
    if key not in sd:
      continue
    value = sd[key]
    if tuple(value.shape) != shape:
      misshaped[key] = (tuple(value.shape), shape)
    elif zoo_path is not None and not jnp.issubdtype(value.dtype,
                                                     jnp.floating):
      misshaped[key] = (f'{tuple(value.shape)} {value.dtype}',
                        f'{shape} floating')
  if missing or unknown or misshaped:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing key(s): {_listing(missing)}')
    if unknown:
      parts.append(f'{len(unknown)} unknown key(s): {_listing(unknown)}')
    if misshaped:
      parts.append(f'{len(misshaped)} misshaped key(s): ' + _listing(
          misshaped.items(),
          lambda kv: f'{kv[0]!r}: checkpoint {kv[1][0]}, expected {kv[1][1]}'))
    raise ConversionError(
        f'the checkpoint does not fit the official {name} ({kind}, '
        f'{num_classes} classes): ' + '; '.join(parts) + '.',
        missing=missing, unknown=unknown, misshaped=misshaped)

  _check_values(sd, plan, name, kind)
  variables: dict[str, Any] = {}
  for key, (zoo_path, layout, _) in plan.items():
    if zoo_path is None:
      continue
    node = variables
    for p in zoo_path[:-1]:
      node = node.setdefault(p, {})
    node[zoo_path[-1]] = _to_zoo(sd[key], layout)
  return ConvertedModel(model, variables, name, kind, num_classes)


def _check_values(sd: dict[str, np.ndarray], plan, name: str,
                  kind: str) -> None:
  """Refuses non-finite weights and negative BatchNorm variances, by key."""
  bad = []
  for key, (zoo_path, _, _) in plan.items():
    if zoo_path is None:
      continue
    value = sd[key]
    finite = np.isfinite(value)
    if not finite.all():
      bad.append(f'{key!r}: {value.size - int(finite.sum())} of {value.size} '
                 'entries are NaN or infinite')
    elif key.endswith('running_var') and (value < 0).any():
      bad.append(f'{key!r}: a negative BatchNorm variance (min '
                 f'{float(value.min()):g})')
  if bad:
    raise ConversionError(
        f'the checkpoint of the official {name} ({kind}) holds values no '
        f'trained model has, so it would give wrong outputs; '
        f'{len(bad)} bad key(s): {_listing(bad, str)}.', unknown=(),
        misshaped={})


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor: no torch import needed
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def load_official(path: str, name: str = 'resnet20', *, kind: str = 'adder',
                  reader: str = 'auto', **model_overrides) -> ConvertedModel:
  """Reads and converts an official checkpoint file in one call.

  :func:`load_state_dict` then :func:`convert_state_dict`; see them for the
  arguments and errors.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> shapes = expected_state_dict_shapes('resnet20', num_classes=100)
    >>> path = os.path.join(tempfile.mkdtemp(), 'r20.npz')
    >>> np.savez(path, **{k: np.ones(s, np.float32) for k, s in shapes.items()})
    >>> load_official(path, 'resnet20').num_classes
    100
  """
  return convert_state_dict(load_state_dict(path, reader=reader), name,
                            kind=kind, **model_overrides)


__all__ = [
    'CIFAR_MEAN', 'CIFAR_STD', 'CONVERT_KINDS', 'ConversionError',
    'ConvertedModel', 'IMAGENET_MEAN', 'IMAGENET_STD', 'OFFICIAL_MODELS',
    'convert_state_dict', 'expected_state_dict_shapes', 'load_official',
    'load_state_dict', 'read_safetensors', 'read_torch_zip',
]

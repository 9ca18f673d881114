"""Reader and writer for the IDX file format of MNIST (raw or gzip-compressed).

An IDX file is: two zero bytes, a type code byte, a byte with the number of
dimensions ``n``, ``n`` big-endian uint32 sizes, then the array data in
big-endian C order. Every field is validated; a corrupt or truncated file
raises :class:`IdxFormatError` naming the file.

Examples:
  >>> import os, tempfile, numpy as np
  >>> path = os.path.join(tempfile.mkdtemp(), 'x-idx3-ubyte.gz')
  >>> write_idx(path, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
  >>> read_idx(path).shape
  (2, 3, 4)
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from experiments import errors

# Type code -> big-endian numpy dtype (the IDX specification's table).
IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
_GZIP_MAGIC = b'\x1f\x8b'


class IdxFormatError(errors.UserError, ValueError):
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

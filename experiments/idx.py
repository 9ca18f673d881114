"""Reader and writer for the IDX file format of MNIST (raw or gzip-compressed).

The format code lives in :mod:`adderjax.datasets` (public); this module gives
the experiments its errors: a corrupt file raises :class:`IdxFormatError`, an
:class:`experiments.errors.UserError` (the command-line programs print it as
one line) that is also :class:`adderjax.datasets.IdxFormatError`.

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

import os

import numpy as np

from adderjax import datasets
from experiments import errors

# Type code -> big-endian numpy dtype (the IDX specification's table).
IDX_DTYPES = datasets.IDX_DTYPES
write_idx = datasets.write_idx


class IdxFormatError(errors.UserError, datasets.IdxFormatError):
  """A file is not a valid IDX file (bad magic, type code, dims or length)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (raw, or gzip-compressed: detected by content).

  :func:`adderjax.datasets.read_idx`, with the experiments' error type.

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
  try:
    return datasets.read_idx(path)
  except datasets.IdxFormatError as e:
    raise IdxFormatError(str(e)) from e

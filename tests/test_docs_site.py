"""The documentation site builds without a warning (issue 28).

``make docs`` builds docs/ (the API reference generated from the docstrings,
the tutorial and the design notes) with Sphinx in nitpicky mode and every
warning an error. :func:`test_docs_site_builds_without_warnings` runs the
same build, with the Makefile's own flags, into a temporary directory: a
docstring that names a renamed function, a cross-reference to a misspelt
name or a docstring docutils cannot parse fails it.
:func:`test_broken_reference_fails_the_build` checks that the configuration
does catch a broken reference to an adderjax name (the ignore list of
docs/conf.py is for other packages' names only).
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'


def sphinx_flags() -> list[str]:
  """The ``SPHINX_FLAGS`` of the Makefile's ``docs`` target."""
  text = (ROOT / 'Makefile').read_text(encoding='utf-8')
  match = re.search(r'^SPHINX_FLAGS\s*:?=\s*(.+)$', text, re.M)
  assert match, 'the Makefile defines no SPHINX_FLAGS'
  return shlex.split(match.group(1))


def build(srcdir: pathlib.Path, outdir: pathlib.Path,
          *extra: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'sphinx', *sphinx_flags(), *extra,
       str(srcdir), str(outdir)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)


def test_makefile_flags_fail_on_warnings():
  flags = sphinx_flags()
  for flag in ('-W', '-n', '--keep-going', '-E'):
    assert flag in flags, (flag, flags)


def test_docs_site_builds_without_warnings(tmp_path):
  out = tmp_path / 'html'
  result = build(DOCS, out)
  warnings = [line for line in result.stderr.splitlines()
              if 'WARNING' in line or 'ERROR' in line]
  assert result.returncode == 0 and not warnings, (
      f'sphinx-build exited {result.returncode}:\n' + '\n'.join(
          warnings or result.stderr.splitlines()[-30:]))
  # The pages are there: the guides, the notes and the API reference.
  for page in ('index', 'tutorial', 'architecture', 'performance',
               'roofline', 'mosaic_gpu', 'api/index', 'api/adderjax',
               'api/linen', 'api/nnx', 'api/optim', 'api/models',
               'api/internals'):
    assert (out / f'{page}.html').is_file(), page
  # The API pages are generated from the docstrings.
  top = (out / 'api/adderjax.html').read_text(encoding='utf-8')
  for name in ('adderjax.adder_conv', 'adderjax.count_ops',
               'adderjax.GRAD_MODES'):
    assert f'id="{name}"' in top, name
  models = (out / 'api/models.html').read_text(encoding='utf-8')
  assert 'id="adderjax.models.create_model"' in models
  assert 'id="adderjax.models.ResNet"' in models


def test_broken_reference_fails_the_build(tmp_path):
  """A misspelt adderjax name, in a reference or a directive, is an error."""
  src = tmp_path / 'src'
  src.mkdir()
  # docs/conf.py's settings, hooks and ignore list, on a one-page site.
  (src / 'conf.py').write_text(
      f'__file__ = {str(DOCS / "conf.py")!r}\n'
      f'exec(compile(open(__file__).read(), __file__, "exec"))\n',
      encoding='utf-8')
  (src / 'index.rst').write_text(
      'Broken\n======\n\n'
      '.. autofunction:: adderjax.adder_conv\n\n'
      'See :func:`adderjax.adder_conv_renamed` and\n'
      ':class:`adderjax.linen.AdderConvolution`.\n\n'
      '.. autofunction:: adderjax.no_such_function\n',
      encoding='utf-8')
  result = build(src, tmp_path / 'html')
  assert result.returncode != 0, result.stderr
  for message in ('target not found: adderjax.adder_conv_renamed',
                  'target not found: adderjax.linen.AdderConvolution',
                  "failed to import 'no_such_function'"):
    assert message in result.stderr, (message, result.stderr)

"""Sphinx configuration of the adderjax documentation site (issue 28).

Build it with ``make docs`` (into ``build/docs``), which runs::

  python -m sphinx -E -W --keep-going -n -b html docs build/docs

Every warning fails the build (``-W``; ``-E`` rereads every page, so an
unchanged page's warnings are not skipped), and nitpicky mode (``-n``) makes a
cross-reference to a name that is not documented -- a renamed function, a
typo -- a warning. The API pages (``docs/api/``) are generated from the
docstrings by autodoc (Google style, read by napoleon); the markdown pages
(tutorial, design notes) are read by MyST. No intersphinx: the build needs no
network, so references to other packages' names (``jax.Array``,
``flax.linen.Module``, ...) cannot be resolved and are ignored below; the
ignore list names other packages only, never ``adderjax`` or
``pallas_kernels``. ``tests/test_docs_site.py`` runs the same build.
"""

from __future__ import annotations

import os
import pathlib
import sys

from docutils import nodes
from sphinx import addnodes
from sphinx.pycode import ModuleAnalyzer
from sphinx.pycode import PycodeError

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Importing the package must not grab an accelerator or print TPU errors.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

project = 'adderjax'
author = 'adderjax authors'
copyright = '2025, adderjax authors'  # pylint: disable=redefined-builtin
release = version = '0.1.0'

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'myst_parser',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build', 'build', '.*']

# autodoc: members in source order; type hints in the parameter lists of the
# descriptions (a Linen module's signature holds reprs such as
# ``<flax.linen.module._Sentinel object>`` that no annotation parser reads).
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_typehints_description_target = 'documented'
autodoc_preserve_defaults = True
autodoc_default_options = {'members': True, 'show-inheritance': True}
autoclass_content = 'class'

# napoleon: Google style only (the project's docstring style).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# `Attributes:` entries become attribute entries: targets of :attr:`Cls.field`.
napoleon_use_ivar = False

# MyST: heading anchors for the `[text](#section)` links of the pages.
myst_heading_anchors = 3

nitpicky = True
# Names of other packages, in type hints and docstrings: no intersphinx
# inventory to resolve them against (the build is offline). Full dotted
# names only (``jax.Array``, ``flax.linen.Module``,
# ``collections.abc.Sequence``); a short or misspelt adderjax name still
# fails the build.
_EXTERNAL = (r'jax|flax|optax|chex|numpy|ml_collections|typing|collections'
             r'|os|pickle')
nitpick_ignore_regex = [
    (r'py:.*', rf'({_EXTERNAL})\..+'),
]

html_theme = 'furo'
html_title = 'adderjax'

# --------------------------------------------------------------------------
# Hooks. Each one fixes a way autodoc or MyST misreads this project; none of
# them silences a warning about an adderjax name.

_PACKAGES = ('adderjax', 'pallas_kernels')


def _skip_field_defaults(app, what, name, obj, skip, options):
  """Leaves out the default values of a class's fields.

  A Linen module's or NamedTuple's fields are documented by the class's
  ``Attributes:`` section. autodoc would also list a field whose default is
  a function or class (``bias_init = initializers.zeros``,
  ``param_dtype = jnp.float32``, ``conv = AdderConv``) as a member of the
  class, with that object's docstring, and a NamedTuple's field accessors
  ("Alias for field number 0"). A method of the class is kept: its
  ``__qualname__`` ends with its name.
  """
  del app, options
  if skip or what != 'class':
    return None
  if type(obj).__name__ == '_tuplegetter':
    return True
  if callable(obj) and (
      getattr(obj, '__qualname__', '').rsplit('.', 1)[-1] != name):
    return True
  return None


def _own_doc_comment(name, obj):
  """The ``#:`` comment of ``obj`` where a module of the project defines it."""
  short = name.rsplit('.', 1)[-1]
  for modname, module in sorted(sys.modules.items()):
    if not modname.startswith(_PACKAGES) or module is None:
      continue
    if vars(module).get(short, _own_doc_comment) is not obj:
      continue
    try:
      analyzer = ModuleAnalyzer.for_module(modname)
      analyzer.analyze()
    except PycodeError:
      continue
    comment = analyzer.attr_docs.get(('', short))
    if comment:
      return list(comment)
  return None


def _reexported_data_doc(app, what, name, obj, options, lines):
  """Gives re-exported data (``adderjax.GRAD_MODES``) its ``#:`` comment.

  autodoc reads a module attribute's ``#:`` comment from the module it
  documents; for a value that module imports, it falls back to the value's
  type's docstring (``tuple``'s). This puts the comment of the module that
  defines the value in its place.
  """
  del app, options
  if what != 'data' or obj.__doc__ != type(obj).__doc__:
    return
  lines[:] = _own_doc_comment(name, obj) or []


def _no_inline_attribute_type(app, what, name, obj, options, lines):
  """Keeps napoleon from reading prose before a colon as a type.

  napoleon reads the first non-blank line of an attribute's or property's
  docstring as ``type: description``; this project's attribute docstrings
  are prose ("45 nm, 32-bit float (Horowitz 2014): add 0.9 pJ, ...") and
  their types come from annotations. An empty reST comment (``..``, which
  renders as nothing) put first gives napoleon a first line without a type.
  """
  del app, name, obj, options
  if what in ('attribute', 'data', 'property') and lines and ':' in lines[0]:
    lines[0:0] = ['..', '']


def _link_repository_files(app, doctree):
  """Links a markdown page's ``[x](../experiments/...)`` to the file itself.

  The design notes link files of the repository outside ``docs/`` (results
  tables, READMEs); they are no pages of this site, so MyST reports an
  unknown document. Such a link to a file that exists becomes a relative
  link to that file in the repository (the site is built inside it, in
  ``build/docs``); a link to a file that does not exist is left to MyST, and
  fails the build.
  """
  srcdir = pathlib.Path(app.srcdir).resolve()
  docname = app.env.docname
  for node in list(doctree.findall(addnodes.pending_xref)):
    if node.get('reftype') != 'myst' or node.get('refdomain') != 'doc':
      continue
    target = (srcdir / docname).parent / node['reftarget']
    target = pathlib.Path(os.path.normpath(target))
    if target.is_relative_to(srcdir):
      continue
    candidates = [target, target.with_name(target.name + '.md')]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None or not found.is_relative_to(ROOT):
      continue
    page_dir = (pathlib.Path(app.outdir) / docname).parent
    link = nodes.reference('', '', internal=False,
                           refuri=os.path.relpath(found, page_dir))
    link += [child.deepcopy() for child in node.children]
    if not link.astext():
      link += nodes.literal(found.name, found.name)
    node.replace_self(link)


def setup(app):
  app.connect('autodoc-skip-member', _skip_field_defaults)
  # Before napoleon (priority 500) reads the docstrings.
  app.connect('autodoc-process-docstring', _reexported_data_doc, priority=100)
  app.connect('autodoc-process-docstring', _no_inline_attribute_type,
              priority=200)
  app.connect('doctree-read', _link_repository_files)
  return {'parallel_read_safe': True}

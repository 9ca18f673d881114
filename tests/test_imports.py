"""The import graph of the project's packages: acyclic, imports at the top.

Every ``.py`` file of ``adderjax/``, ``experiments/`` and ``pallas_kernels/``
is parsed with :mod:`ast` (nothing is imported), and each ``import`` of one
of the project's modules becomes an edge of a graph, the imports inside
functions included. The graph must have no cycle, and an import inside a
function may only name an optional heavy dependency (:data:`OPTIONAL`): one
that a user of the library may not have installed, or that takes seconds to
import and only one path needs.
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('adderjax', 'experiments', 'pallas_kernels')

#: Top-level packages a function may import: optional (not in the library's
#: dependencies) or heavy, and needed by one path only.
OPTIONAL = frozenset({
    'torch',                # adderjax.official: reading .pth checkpoints
    'matplotlib',           # figures
    'tensorflow',           # experiments.data: the TFDS input pipeline
    'tensorflow_datasets',  # experiments.data: CIFAR / ImageNet
    'tensorboardX',         # experiments.metrics: optional TensorBoard files
    'tqdm',                 # progress bars
})

#: ``(file, imported module)`` pairs allowed for now, each with its reason.
PENDING = frozenset()


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len('.py')]
  parts = rel.split(os.sep)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def project_files() -> dict[str, str]:
  """``{module name: path}`` of every ``.py`` file of :data:`PACKAGES`."""
  files = {}
  for package in PACKAGES:
    for directory, _, names in os.walk(os.path.join(REPO, package)):
      for name in names:
        if name.endswith('.py'):
          path = os.path.join(directory, name)
          files[_module_name(path)] = path
  return files


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The absolute module of a ``from`` import (relative ones resolved)."""
  if not node.level:
    return node.module or ''
  base = module.split('.')
  base = base[:len(base) - node.level + (1 if is_package else 0)]
  return '.'.join(base + ([node.module] if node.module else []))


def imports(path: str, module: str, known) -> list[tuple[str, bool, int]]:
  """``(imported module, inside a function, line)`` of every import.

  ``from package import name`` counts as an import of ``package.name`` when
  that is a module of ``known``, else of ``package``.
  """
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
  is_package = path.endswith('__init__.py')
  found = []
  for node in ast.walk(tree):
    inside = id(node) in in_function
    if isinstance(node, ast.Import):
      found += [(alias.name, inside, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(node, module, is_package)
      for alias in node.names:
        full = f'{base}.{alias.name}'
        # A project name that is not a module is an attribute of `base`.
        ours = base.split('.')[0] in PACKAGES
        found.append((base if ours and full not in known else full, inside,
                      node.lineno))
  return found


def _resolve(name: str, known) -> str | None:
  """The project module an imported name executes (longest known prefix)."""
  parts = name.split('.')
  while parts:
    candidate = '.'.join(parts)
    if candidate in known:
      return candidate
    parts.pop()
  return None


def import_graph():
  """``({module: {imported project modules}}, [function-level imports])``."""
  files = project_files()
  graph, local = {}, []
  for module, path in sorted(files.items()):
    edges = set()
    for name, inside, line in imports(path, module, files):
      target = _resolve(name, files)
      if target is not None and target != module:
        edges.add(target)
      if inside:
        local.append((os.path.relpath(path, REPO), name, line))
    graph[module] = edges
  return graph, local


def find_cycle(graph) -> list[str] | None:
  """One cycle of ``graph`` as a list of modules, or ``None``."""
  state = {}  # module -> 1 on the stack, 2 done

  def visit(node, stack):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, stack)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [])
      if cycle:
        return cycle
  return None


def test_the_graph_covers_every_package():
  graph, _ = import_graph()
  assert {'adderjax', 'adderjax.ops.adder', 'experiments.experiment',
          'experiments.cli', 'pallas_kernels'} <= set(graph)
  assert 'experiments.experiment' in graph['experiments.train']


def test_find_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a', 'b', 'c', 'a']


def test_no_import_cycles_counting_imports_inside_functions():
  graph, _ = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_functions_import_only_optional_heavy_dependencies():
  _, local = import_graph()
  bad = [f'{path}:{line}: {name}' for path, name, line in local
         if name.split('.')[0] not in OPTIONAL and (path, name) not in PENDING]
  assert not bad, ('imports inside functions (move them to the top of the '
                   'file, or add an optional heavy dependency to OPTIONAL): '
                   + '; '.join(bad))

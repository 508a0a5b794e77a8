"""The package's modules depend on each other in one direction only.

Every import between msrd_jax modules (at the top of a file or inside a function) is an
edge; the graph must have no cycle, so that each layer can be read, tested and changed
without the ones above it. And every module imports on its own, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import msrd_jax

PACKAGE_DIR = os.path.dirname(msrd_jax.__file__)


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for folder, _, names in os.walk(PACKAGE_DIR):
    for name in names:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE_DIR))
        dotted = rel[:-3].replace(os.sep, '.')
        out[dotted.removesuffix('.__init__')] = os.path.join(folder, name)
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules that the file at `path` imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    found.update(n for n in names if n in modules)
  return found


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  # A package imports its own submodules to re-export them; that is not a cycle.
  graph = {m: {d for d in deps if not d.startswith(m + '.')} for m, deps in graph.items()}
  done, path = set(), []

  def visit(m):
    if m in path:
      raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(m) :] + [m]))
    if m in done:
      return
    path.append(m)
    for d in sorted(graph[m]):
      visit(d)
    path.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)
  assert len(done) == len(modules) > 20


def test_every_module_imports_alone():
  # One fresh interpreter; between modules every msrd_jax module is forgotten, so each
  # import starts from nothing of the package (third-party modules stay loaded: fast).
  script = (
    'import importlib, sys\n'
    f'for name in {sorted(_modules())!r}:\n'
    '  for m in [m for m in sys.modules if m == "msrd_jax" or m.startswith("msrd_jax.")]:\n'
    '    del sys.modules[m]\n'
    '  importlib.import_module(name)\n'
  )
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

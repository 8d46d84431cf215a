"""The house rules of ../shared/STYLE.md, checked on the source (issue 19).

`python -m tests.test_layout` prints the figures: the longest function of
each package, private TF-Agents/Reverb attributes touched outside
common/compat.py, log-parsing regular expressions in launcher/ and bench/,
import cycles, and imports across process packages.
"""

import ast
import os
from typing import Dict, List, Set, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_PACKAGES = ('actor', 'learner', 'replay_server', 'variable_container',
                    'launcher')
PACKAGES = PROCESS_PACKAGES + ('common', 'bench')
# The one module that may touch private attributes of TF-Agents and Reverb.
COMPAT = 'common/compat.py'
# Tests scanned for private attributes too, but for these two: the parity
# tests that guard COMPAT, and this file (which names the rule).
PRIVATE_EXEMPT = (COMPAT, 'tests/test_compat.py', 'tests/test_layout.py')
# Public modules of a process package, for the other roles to use (as
# `reverb.client` is Reverb's): the variable container's clients and table
# definitions (every replay shard serves the variables too), the replay
# server's serve loop (the variable container runs it over its own tables),
# the localhost cluster fixture (tests and bench). Anything else of a
# process package is its own.
PUBLIC = {'variable_container', 'variable_container.client',
          'variable_container.status', 'variable_container.one_value',
          'variable_container.contract', 'variable_container.tables',
          'replay_server.server', 'launcher.local_cluster'}
# Underscore names that are public API (os._exit, sys._current_frames,
# namedtuple methods).
PUBLIC_UNDERSCORE = {'_exit', '_current_frames', '_replace', '_asdict',
                     '_fields', '_make'}
# A function of a process package reads in one screen.
MAX_FUNCTION_LINES = 60


def _sources(packages=PACKAGES) -> Dict[str, ast.Module]:
  found = {}
  for package in packages:
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          with open(path) as f:
            found[os.path.relpath(path, REPO_ROOT)] = ast.parse(f.read())
  return found


def _module_name(path: str) -> str:
  name = path[:-3].replace(os.sep, '.')
  return name[:-len('.__init__')] if name.endswith('.__init__') else name


def _imports(tree: ast.Module, module: str, known: Set[str]) -> Set[str]:
  """The project modules `tree` imports (module level or in functions)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = module.split('.')[:-node.level]
        base = '.'.join(parts + ([base] if base else []))
      names = [f'{base}.{alias.name}' for alias in node.names]
      if not any(name in known for name in names):
        names = [base]  # Names defined in the module `base` itself.
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition('.')[0]
      if name and name != module:
        found.add(name)
  return found


def import_graph() -> Dict[str, Set[str]]:
  sources = _sources(PACKAGES + ('tests',))
  known = {_module_name(p) for p in sources} | set(PACKAGES) | {'tests'}
  return {_module_name(p): _imports(t, _module_name(p), known)
          for p, t in sources.items()}


def import_cycles() -> List[List[str]]:
  """Each strongly connected group of more than one module (Tarjan)."""
  graph = import_graph()
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in graph.get(node, ()):
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      group = []
      while True:
        other = stack.pop()
        on_stack.discard(other)
        group.append(other)
        if other == node:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return groups


def private_attributes() -> List[str]:
  """`obj._name` outside COMPAT (and its parity tests) where obj is not
  self/cls, in the packages and tests/."""
  found = []
  for path, tree in _sources(PACKAGES + ('tests',)).items():
    if path in PRIVATE_EXEMPT:
      continue
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and
          not node.attr.startswith('__') and
          node.attr not in PUBLIC_UNDERSCORE and
          not (isinstance(node.value, ast.Name) and
               node.value.id in ('self', 'cls'))):
        found.append(f'{path}:{node.lineno}: .{node.attr}')
  return found


def log_regexes() -> List[str]:
  """Uses of the `re` module in launcher/ and bench/ (status is data)."""
  found = []
  for path, tree in _sources(('launcher', 'bench')).items():
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id == 're'):
        found.append(f'{path}:{node.lineno}: re.{node.attr}')
  return found


def foreign_imports() -> List[str]:
  """Imports of another process package's non-public modules, of a process
  package from common/, and of tests from bench/."""
  found = []
  for module, imported in sorted(import_graph().items()):
    package = module.split('.')[0]
    for other in sorted(imported):
      other_package = other.split('.')[0]
      if package == 'bench' and other_package == 'tests':
        found.append(f'{module} imports {other}')
      elif package == 'common' and other_package in PROCESS_PACKAGES:
        found.append(f'{module} imports {other}')
      elif (package in PROCESS_PACKAGES and other_package != package and
            other_package in PROCESS_PACKAGES and other not in PUBLIC):
        found.append(f'{module} imports {other}')
  return found


def longest_functions() -> Dict[str, Tuple[int, str]]:
  """{package: (lines, 'path:function')} of its longest function."""
  longest = {}
  for path, tree in _sources().items():
    package = path.split(os.sep)[0]
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > longest.get(package, (0, ''))[0]:
          longest[package] = (lines, f'{path}:{node.name}')
  return longest


def test_private_internals_only_in_compat():
  assert not private_attributes()


def test_no_log_parsing_in_launcher_and_bench():
  assert not log_regexes()


def test_no_import_cycles():
  assert not import_cycles()


def test_packages_keep_to_their_room():
  assert not foreign_imports()


def test_functions_read_in_one_screen():
  too_long = {package: found for package, found in longest_functions().items()
              if package in PROCESS_PACKAGES + ('common',) and
              found[0] > MAX_FUNCTION_LINES}
  assert not too_long


if __name__ == '__main__':
  for package, (lines, where) in sorted(longest_functions().items()):
    print(f'longest function  {package:20s} {lines:4d}  {where}')
  for name, found in (('private attributes outside compat',
                       private_attributes()),
                      ('regexes in launcher/ and bench/', log_regexes()),
                      ('import cycles', import_cycles()),
                      ('foreign imports', foreign_imports())):
    print(f'{name}: {len(found)}')
    for item in found:
      print('   ', item)

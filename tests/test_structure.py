"""The package graph and the flag discipline, read from the source with `ast`."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("core", "estimators", "models", "serving", "evaluation", "pipeline")
# Lower layers first: a package may import only itself and those before it.
LAYERS = {"core": 0, "estimators": 1, "models": 2, "serving": 3, "evaluation": 4,
          "pipeline": 5}


def _modules() -> dict[str, ast.Module]:
  found = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).glob("*.py")):
      found[f"{package}.{path.stem}"] = ast.parse(path.read_text(), str(path))
  return found


def _imported_packages(tree: ast.Module) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split(".")[0])
  return names & set(PACKAGES)


def _package_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
  for name, tree in modules.items():
    package = name.split(".")[0]
    graph[package] |= _imported_packages(tree) - {package}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle of `graph` as a path [a, b, ..., a], or [] if it is acyclic."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str]:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return []

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return []


def test_cycle_finder_finds_a_planted_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) == []


def test_no_import_cycle_between_packages():
  assert _cycle(_package_graph(_modules())) == []


def test_packages_import_only_lower_layers():
  upward = sorted(f"{p} -> {q}" for p, deps in _package_graph(_modules()).items()
                  for q in deps if LAYERS[q] > LAYERS[p])
  assert upward == []


def _is_flag_definition(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith("DEFINE"))


def _flag_names(tree: ast.Module) -> set[str]:
  """Module-level names bound to a flag holder, plus FLAGS."""
  names = {"FLAGS"}
  for node in tree.body:
    if isinstance(node, ast.Assign) and _is_flag_definition(node.value):
      names.update(t.id for t in node.targets if isinstance(t, ast.Name))
  return names


def _apps(modules: dict[str, ast.Module]) -> set[str]:
  return {name for name, tree in modules.items()
          if any(_is_flag_definition(n) for n in ast.walk(tree))}


def _imported_modules(tree: ast.Module) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_no_module_imports_an_app():
  """Two apps in one process would define their flags twice (and clash)."""
  modules = _modules()
  apps = _apps(modules)
  offenders = sorted(f"{name} imports {app}" for name, tree in modules.items()
                     for app in _imported_modules(tree) & apps if app != name)
  assert offenders == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_flags_are_defined_and_read_only_by_entry_points(name):
  tree = _modules()[name]
  functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
  defines = [n for n in ast.walk(tree) if _is_flag_definition(n)]
  if defines:
    assert "main" in functions, f"{name} defines flags but has no main(argv)"
  holders = _flag_names(tree)
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "main":
      if isinstance(node, ast.FunctionDef) and node in tree.body and node.name == "main":
        continue
      used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & holders
      assert not used, f"{name}.{node.name} reads flags {sorted(used)} outside main"

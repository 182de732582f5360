"""bonejax/predict/ reads like pages: no function over 120 lines, no module over 600, and no
import cycle among its modules (every import, module-level or inside functions)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bonejax" / "predict"


def modules() -> dict[str, ast.Module]:
  return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_long_functions_or_modules():
  for name, tree in modules().items():
    lines = (PACKAGE / f"{name}.py").read_text().count("\n")
    assert lines <= 600, f"{name}.py has {lines} lines"
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        assert n <= 120, f"{name}.{node.name} has {n} lines"


def imports_of(tree: ast.Module, names: set[str]) -> set[str]:
  """The sibling modules a module imports (bonejax.predict.X, or X from bonejax.predict)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name.rsplit(".", 1)[1] for a in node.names
                if a.name.startswith("bonejax.predict.")}
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.startswith("bonejax.predict."):
        found.add(node.module.split(".")[2])
      elif node.module == "bonejax.predict":
        found |= {a.name for a in node.names}
  return found & names


def test_no_import_cycle():
  trees = modules()
  names = set(trees) - {"__init__"}
  graph = {m: imports_of(trees[m], names) - {m} for m in names}
  state: dict[str, int] = {}

  def visit(m, path):
    state[m] = 1
    for n in sorted(graph[m]):
      assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
      if n not in state:
        visit(n, path + [m])
    state[m] = 2

  for m in sorted(names):
    if m not in state:
      visit(m, [])

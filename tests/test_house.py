"""The shape of the package: no import cycle, modules that read like a page, short functions
where the work is, and a README layout table that matches the folders."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bonejax"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120
SHORT_FUNCTION_ROOMS = ("predict", "train")


def module_name(path: Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def modules() -> dict[str, Path]:
  return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_block(node: ast.AST) -> bool:
  test = getattr(node, "test", None)
  return isinstance(node, ast.If) and (
      (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
      or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
  """Every bonejax module `name` imports, lazily inside functions too (TYPE_CHECKING aside)."""
  tree = ast.parse(path.read_text())
  is_package = path.name == "__init__.py"
  found: set[str] = set()

  def visit(node: ast.AST) -> None:
    if _type_checking_block(node):
      return
    if isinstance(node, ast.Import):
      for a in node.names:
        found.add(a.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      found.add(base)
      for a in node.names:
        found.add(f"{base}.{a.name}")
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  out = set()
  for f in found:
    while f and f not in known:
      f = f.rpartition(".")[0]
    if f and f != name:
      out.add(f)
  return out


def test_no_import_cycle():
  mods = modules()
  known = set(mods)
  graph = {m: imports_of(m, p, known) for m, p in mods.items()}
  # A package's __init__ importing its own submodules is how packages work, not a cycle.
  for m in graph:
    graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and mods[m].name == "__init__.py")}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []
  counter = [0]

  def strongconnect(v):  # Tarjan's strongly connected components
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  import sys
  sys.setrecursionlimit(10000)
  for v in graph:
    if v not in index:
      strongconnect(v)
  assert not cycles, f"import cycles: {cycles}"


def test_modules_read_like_a_page():
  long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
  assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize("room", SHORT_FUNCTION_ROOMS)
def test_functions_are_short_where_the_work_is(room):
  long = {}
  for p in (PACKAGE / room).rglob("*.py"):
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long[f"{p.relative_to(REPO)}:{node.name}"] = n
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_readme_layout_table_names_every_package_folder():
  text = (REPO / "README.md").read_text()
  section = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
  named = set(re.findall(r"`bonejax/([a-z_]+)/`", section))
  folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  assert named == folders, (f"README layout table: missing {sorted(folders - named)}, "
                            f"stale {sorted(named - folders)}")
  loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
  assert not loose, f"loose modules in bonejax/: {loose}"

"""The package layout: arrows point down (cli -> flows -> tasks -> models), no module imports
itself back through others, and no Python file outside tests grows past 300 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "config", "flows", "models", "preflight", "reports", "runtime", "tasks",
            "tracking")
#: What each layer may not import: the arrows of docs/design.md, read backwards.
FORBIDDEN = {
    "models": {"cli", "flows", "tasks", "tracking", "reports", "preflight"},
    "tasks": {"cli", "flows"},
    "flows": {"cli"},
    # config reads a data file's header through the data stage's peek functions
    # (tasks.data_files, tasks.data_tables) to check sizes before start-up; nothing more.
    "config": {"cli", "flows", "tracking", "reports", "preflight"},
    "runtime": {"cli", "flows", "tasks", "tracking", "reports", "preflight"},
    "tracking": {"cli", "flows"},
    "reports": {"cli", "flows"},
    "preflight": {"cli", "flows"},
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that a file imports anywhere (module level or inside functions),
    except under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and not n.endswith("__init__")}
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_arrows_point_down():
    wrong = sorted(f"{m} imports {t}" for m, targets in graph().items() for t in targets
                   if t.split(".")[0] in FORBIDDEN.get(m.split(".")[0], ()))
    assert not wrong, wrong


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m: str) -> list[str]:
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = "done"
        stack.pop()
        return []

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    assert find_cycle(graph()) == []


def test_no_python_file_outside_tests_is_over_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if not {"tests", ".venv", "build"} & set(p.relative_to(ROOT).parts)
            and (n := len(p.read_text().splitlines())) > 300}
    assert not long, long

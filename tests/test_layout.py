"""The package layout: arrows point down (cli -> flows -> tasks -> models), no module imports
itself back through others, only ``sources`` opens data files, and no Python file outside
tests grows past 300 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "config", "flows", "models", "preflight", "reports", "runtime", "sources",
            "tasks", "tracking")
#: What each layer may not import: the arrows of docs/design.md, read backwards.
FORBIDDEN = {
    "models": {"cli", "flows", "tasks", "tracking", "reports", "preflight", "sources"},
    "tasks": {"cli", "flows"},
    "flows": {"cli"},
    # config reads a data file's header through sources.headers to check sizes before
    # start-up; the data stage's tasks are above it.
    "config": {"cli", "flows", "tasks", "tracking", "reports", "preflight"},
    # the one reader of data files: it takes a data config's fields, not the config
    "sources": {"cli", "flows", "tasks", "tracking", "reports", "preflight", "config"},
    "runtime": {"cli", "flows", "tasks", "tracking", "reports", "preflight", "sources"},
    "tracking": {"cli", "flows"},
    "reports": {"cli", "flows"},
    "preflight": {"cli", "flows"},
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: set[str], typing: bool = False) -> set[str]:
    """Project modules that a file imports anywhere (module level or inside functions),
    and, with ``typing``, under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    typing_only = set() if typing else {
        id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
        and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
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


def test_config_and_sources_import_nothing_above_them_even_for_type_hints():
    mods = project_modules()
    wrong = sorted(f"{m} imports {t}" for m, p in mods.items()
                   if (pkg := m.split(".")[0]) in ("config", "sources")
                   for t in imports(p, set(mods), typing=True)
                   if t.split(".")[0] in FORBIDDEN[pkg])
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


#: Modules that open data files: archives, compressed IDX files, Parquet, torchvision's sets.
DATA_MODULES = ("zipfile", "gzip", "pyarrow", "torchvision")
#: numpy's and pandas's readers of files.
DATA_CALLS = {"np": {"load", "memmap", "fromfile", "loadtxt", "genfromtxt"},
              "numpy": {"load", "memmap", "fromfile", "loadtxt", "genfromtxt"},
              "pd": {"read_*"}, "pandas": {"read_*"}}


def data_file_reads(path: Path) -> set[str]:
    """What in a file opens a data file: an import of :data:`DATA_MODULES` (or of a reader
    from numpy or pandas), or a call such as ``np.load`` or ``pd.read_csv``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        else:
            continue
        for name in names:
            head, _, attr = name.partition(".")
            readers = DATA_CALLS.get(head, set())
            if (head in DATA_MODULES or attr in readers
                    or ("read_*" in readers and attr.startswith("read_"))):
                found.add(name)
    return found


def test_only_sources_opens_data_files():
    """Headers, sources, the raw test split: every package asks ``sources``, none reads a
    data file itself."""
    found = {m: reads for m, p in project_modules().items()
             if m.split(".")[0] != "sources" and (reads := data_file_reads(p))}
    assert not found, found
    readers = {m: data_file_reads(p) for m, p in project_modules().items()
               if m.split(".")[0] == "sources"}  # the check sees the readers where they are
    assert {"zipfile", "np.load"} <= readers["sources.npz"]
    assert {"gzip", "torchvision.datasets"} <= readers["sources.idx"]
    assert {"pd.read_csv", "pd.read_parquet", "pyarrow.parquet"} <= readers["sources.tables"]

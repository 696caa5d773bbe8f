"""The package layout: every import points down the layers of docs/design.md, no module
imports itself back through others, and no Python file outside tests grows past the alarm.

Imports count wherever they are written: at module level, inside functions, and under
``if TYPE_CHECKING:`` (a type-only import is still a dependency a reader has to follow).
"""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The layers, top first (docs/design.md, "Layout"): a module may import its own package and
#: the packages after it, never one before it.
LAYERS = ("cli", "flows", "preflight", "tasks", "reports", "tracking", "training", "config",
          "sources", "models", "runtime")
PACKAGES = ("cli", "config", "flows", "models", "preflight", "reports", "runtime", "sources",
            "tasks", "tracking", "training")
#: Lines past which a file sets off the alarm (see the test that reads it).
ALARM_LINES = 600


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imported_names(node: ast.AST) -> list[str]:
    """What an import statement names: ``a.b`` for ``import a.b``; ``a`` and ``a.x`` for
    ``from a import x``; nothing for any other node (or a relative import)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that a file imports anywhere: module level, inside functions, and
    under ``if TYPE_CHECKING:``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        found |= {n for n in imported_names(node) if n in known and not n.endswith("__init__")}
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def climbs(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every (module, imported module) whose package is in a higher layer than its own."""
    rank = {package: i for i, package in enumerate(LAYERS)}
    return {(m, t) for m, targets in edges.items() for t in targets
            if rank[t.split(".")[0]] < rank[m.split(".")[0]]}


def test_every_package_is_checked_and_has_a_layer():
    """A new package joins ``PACKAGES`` (and pyproject.toml's) with its place in ``LAYERS``."""
    assert set(PACKAGES) <= set(LAYERS), set(PACKAGES) - set(LAYERS)
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk - {"benchmarks"} == set(PACKAGES), on_disk ^ set(PACKAGES)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {f"{p}*" for p in PACKAGES} == set(installed)


def test_the_layers_are_the_ones_docs_design_md_lists():
    text = (ROOT / "docs" / "design.md").read_text()
    assert " > ".join(LAYERS) in text


def test_the_climb_finder_finds_a_climb():
    edges = {"models.a": {"runtime.b", "training.c"}, "cli.d": {"runtime.b"}}
    assert climbs(edges) == {("models.a", "training.c")}


def test_arrows_point_down():
    wrong = sorted(f"{m} imports {t}" for m, t in climbs(graph()))
    assert not wrong, wrong


def test_runtime_imports_no_other_project_package():
    wrong = sorted(f"{m} imports {t}" for m, targets in graph().items() for t in targets
                   if m.startswith("runtime.") and not t.startswith("runtime."))
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


def test_type_checking_imports_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from training.engine import PopulationSystem\n")
    assert imports(source, {"training.engine", "training.engine.PopulationSystem"}) == {
        "training.engine", "training.engine.PopulationSystem"}


def test_no_import_cycles():
    assert find_cycle(graph()) == []


def test_no_python_file_outside_tests_is_past_the_alarm():
    """Files are cut by concept (one concept per file, docs/design.md), not by length: a
    file is as long as its concept needs. ``ALARM_LINES`` is an alarm, not a target: a file
    past it almost certainly holds more than one concept and wants splitting where they
    part."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if not {"tests", ".venv", "build"} & set(p.relative_to(ROOT).parts)
            and (n := len(p.read_text().splitlines())) > ALARM_LINES}
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
        names = imported_names(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
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

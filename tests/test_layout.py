"""The package layout: every import points down the layers of docs/design.md, no module
imports itself back through others, and no Python file outside tests grows past the alarm.

Imports count wherever they are written: at module level, inside functions, and under
``if TYPE_CHECKING:`` (a type-only import is still a dependency a reader has to follow).
"""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The layers, top first (docs/design.md, "Layout"): a module may import its own package and
#: the packages after it, never one before it. ``sources`` is a layer that may not exist yet.
LAYERS = ("cli", "flows", "preflight", "tasks", "reports", "tracking", "training", "config",
          "sources", "models", "runtime")
PACKAGES = ("cli", "config", "flows", "models", "preflight", "reports", "runtime", "tasks",
            "tracking", "training")
#: Imports that still climb a layer, as (importing module, imported module), each to be
#: removed by the change that fixes it. Temporary: the list may only shrink; an entry no
#: longer needed fails ``test_known_climbs_are_all_still_needed``.
KNOWN_CLIMBS = {
    # config checks a data file's sizes from its header through the data stage's readers
    ("config.overrides", "tasks.data_files"),
    ("config.overrides", "tasks.data_tables"),
    # tracking logs the served model and its test inputs through the stages' loaders
    ("tracking.records", "tasks.data"),
    ("tracking.records", "tasks.evaluate"),
    ("tracking.autoencoder_records", "tasks.reconstruct"),
    # the ablation's outputs are typed with the flow's cell outcome (type-only import)
    ("reports.ablation_outputs", "flows.ablation_stages"),
}
#: Lines past which a file sets off the alarm (see the test that reads it).
ALARM_LINES = 600


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that a file imports anywhere: module level, inside functions, and
    under ``if TYPE_CHECKING:``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def test_the_file_map_of_docs_design_md_names_every_module_of_the_lower_layers():
    text = (ROOT / "docs" / "design.md").read_text()
    missing = sorted(f"{pkg}/{p.name}" for pkg in ("training", "models", "runtime")
                     for p in (ROOT / pkg).glob("*.py")
                     if p.name != "__init__.py"
                     and not re.search(rf"(?<!\w){re.escape(p.name)}", text))
    assert not missing, missing


def test_the_climb_finder_finds_a_climb():
    edges = {"models.a": {"runtime.b", "training.c"}, "cli.d": {"runtime.b"}}
    assert climbs(edges) == {("models.a", "training.c")}


def test_arrows_point_down():
    wrong = sorted(f"{m} imports {t}" for m, t in climbs(graph()) - KNOWN_CLIMBS)
    assert not wrong, wrong


def test_known_climbs_are_all_still_needed():
    fixed = sorted(f"{m} -> {t}" for m, t in KNOWN_CLIMBS - climbs(graph()))
    assert not fixed, f"no longer climbing, remove from KNOWN_CLIMBS: {fixed}"


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

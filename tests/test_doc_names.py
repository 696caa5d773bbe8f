"""The docs name only what exists: every project file, folder, module and ``module.name``
written in code style in the README, in docs/ or in a docstring or comment of the code
exists; and docs/design.md's map names every module."""

from __future__ import annotations

import ast
import fnmatch
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "flows", "preflight", "tasks", "reports", "tracking", "training",
            "config", "sources", "models", "runtime")
FOLDERS = (*PACKAGES, "benchmarks", "tests", "docs", ".ci")
#: The changelog records what was, under the names it had.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md")
                                    if p.name != "changelog.md")]
#: Recorded names that share a config section's prefix without being a field.
RECORDED = {"runtime.precision_used"}  # the MLflow param tracking.tracker.environment_params logs
#: A name in code style: `x` in Markdown, ``x`` in a docstring or comment.
MD_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
RST_SPAN = re.compile(r"``([^`\n]+)``")
#: A project path (``tasks/data.py``, ``flows/``) or dotted name (``tasks.data.load_data``).
NAME = re.compile(r"^(?:%s)(?:[./][A-Za-z_][\w]*)*(?:\.py|/)?$" % "|".join(
    re.escape(f) for f in FOLDERS))


def code_files() -> list[Path]:
    return sorted(p for d in (*PACKAGES, "benchmarks") for p in (ROOT / d).rglob("*.py"))


@lru_cache(maxsize=None)
def top_level(path: Path) -> dict[str, Optional[ast.ClassDef]]:
    """The names a module defines or imports at top level (a class maps to its node)."""
    names: dict[str, Optional[ast.ClassDef]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = None
        elif isinstance(node, ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
    return names


def class_members(node: ast.ClassDef) -> set[str]:
    found = set()
    for n in node.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(n.name)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            found.add(n.target.id)
        elif isinstance(n, ast.Assign):
            found |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    return found


def config_field(parts: list[str]) -> Optional[str]:
    """Why ``section.field`` (``runtime.seed``; also ``config.model.hidden_sizes``) is not
    a field of the config, or None."""
    from config.stages import PipelineConfig

    model = PipelineConfig
    for part in parts:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return f"the config has no field {'.'.join(parts)}"
        model = fields[part].annotation
    return None


def missing(name: str) -> Optional[str]:
    """Why ``name`` (a path or dotted name of the project, or a config field) does not
    exist, or None."""
    from config.stages import PipelineConfig

    parts = name.split(".")
    sections = set(PipelineConfig.model_fields)
    if name in RECORDED:
        return None
    if parts[0] == "config" and len(parts) > 1 and parts[1] in sections:
        return config_field(parts[1:])
    if (parts[0] in sections and len(parts) > 1 and "/" not in name
            and not (ROOT / parts[0] / f"{parts[1]}.py").exists()
            and not (ROOT / parts[0] / parts[1]).is_dir()):
        return config_field(parts)
    if "/" in name or name.endswith(".py") or name in FOLDERS:
        path = ROOT / name
        return None if path.exists() else f"no file or folder {name}"
    for i in range(len(parts), 0, -1):  # the longest prefix that is a module or package
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").exists() else (
            base / "__init__.py" if (base / "__init__.py").exists() else None)
        if module is not None or (i == 1 and base.is_dir()):
            break
    else:
        return f"no module {parts[0]}"
    rest = parts[i:]
    if not rest:
        return None
    if module is None:
        return f"no module {'.'.join(parts[:i + 1])}"
    defined = top_level(module)
    if rest[0] not in defined:
        return f"{'.'.join(parts[:i])} defines no {rest[0]}"
    node = defined[rest[0]]
    if len(rest) > 1 and node is not None and rest[1] not in class_members(node):
        return f"{'.'.join(parts[:i + 1])} has no {rest[1]}"
    return None


def named_in(path: Path) -> set[str]:
    """The project names a file writes in code style."""
    text = path.read_text()
    spans = RST_SPAN.findall(text) if path.suffix == ".py" else MD_SPAN.findall(text)
    names = set()
    for span in spans:
        for token in re.split(r"[\s,()\[\]:=<>'\"]+", span):
            token = token.rstrip(".`")
            if NAME.match(token) and not token.startswith(("tests.", "docs.")):
                names.add(token)
    return names


def test_every_name_in_the_docs_and_the_code_exists() -> None:
    wrong = {f"{path.relative_to(ROOT)}: {why}"
             for path in [*DOCS, *code_files()] for name in named_in(path)
             if (why := missing(name))}
    assert not wrong, sorted(wrong)


def test_a_stale_name_is_found() -> None:
    assert missing("tasks.data.load_data") is None
    assert missing("tracking/recorder.py") is None
    assert missing("tracking.recorder.PipelineRecorder.stage") is None
    assert missing("flows.stages.StageRecorder") == "flows defines no stages"
    assert missing("tasks.data.no_such_function") == "tasks.data defines no no_such_function"
    assert missing("flows/reconstruct.py") == "no file or folder flows/reconstruct.py"
    assert missing("runtime.seed") is None and missing("config.model.hidden_sizes") is None
    assert missing("runtime.no_such_field") == "the config has no field runtime.no_such_field"


def test_the_design_map_names_every_module() -> None:
    """A module is named by its file (``recorder.py``), a glob (``data*.py``) or its path."""
    design = (ROOT / "docs" / "design.md").read_text()
    written = set(re.findall(r"[\w*]+\.py", design))
    unnamed = [str(p.relative_to(ROOT)) for p in code_files()
               if p.name != "__init__.py" and p.parts[-2] != "benchmarks"
               and not any(fnmatch.fnmatch(p.name, w) for w in written)]
    assert not unnamed, f"docs/design.md's map does not name {unnamed}"

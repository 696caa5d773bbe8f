"""The README and docs/: every relative link resolves, and the README stays a short guide."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

# [text](target) outside code spans; the target ends at whitespace or ")".
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings.

    Args:
        path: The markdown file.

    Returns:
        One slug per heading: lower case, punctuation other than ``-`` and ``_`` dropped,
        spaces turned into ``-`` (``## The `erhan-small` grid`` -> ``the-erhan-small-grid``).
    """
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(path: Path) -> list[str]:
    """Relative links in a markdown file whose file, or heading anchor, does not exist.

    Args:
        path: The markdown file; links resolve against its folder.

    Returns:
        One ``"target: why"`` line per broken link; web and mail links are not checked.
    """
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A `code` heading, here\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-code-heading-here) [web](https://example.org/x.md)\n"
        "`[in code](gone.md)` [gone](gone.md) [bad anchor](there.md#nowhere)\n"
        "```\n[fenced](gone-too.md)\n```\n",
        encoding="utf-8",
    )
    assert [line.split(":")[0] for line in broken_links(page)] == [
        "gone.md",
        "there.md#nowhere",
    ]


def test_docs_folder_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in DOCS[1:] if f"(docs/{p.name})" not in readme]
    assert unlinked == []


def test_readme_stays_short() -> None:
    n_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines < README_MAX_LINES, (
        f"README.md has {n_lines} lines; keep it under {README_MAX_LINES} and move detail "
        "into docs/"
    )


def test_the_worker_command_said_to_work_in_any_directory_is_absolute() -> None:
    """A worker started elsewhere must find the checkout's prefect: no relative path."""
    for path in (ROOT / "README.md", ROOT / "docs" / "service.md"):
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
        lines = [ln.strip() for b in blocks for ln in b.splitlines() if " worker start " in ln]
        assert lines, path
        for line in lines:
            assert line.startswith(("/", "$PWD/", "prefect ")), (path.name, line)


def test_the_configuration_reference_has_every_key_with_its_default() -> None:
    """docs/configuration.md's table: one row per key ``--set`` accepts, its default as the
    config holds it and its meaning starting with the field's own description."""
    import json

    from config.overrides import known_keys
    from config.stages import PipelineConfig

    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if m := re.match(r"\| `([a-z_.0-9]+)` \| `(.*?)` \| (.*) \|$", line):
            rows[m.group(1)] = (m.group(2), m.group(3))
    defaults = PipelineConfig().model_dump(mode="json")
    assert sorted(rows) == sorted(known_keys())
    for key in known_keys():
        model, *path, name = [PipelineConfig, *key.split(".")]
        for part in path:
            model = model.model_fields[part].annotation
        value = defaults
        for part in key.split("."):
            value = value[part]
        default, meaning = rows[key]
        if key != "data.data_dir":  # the cell says where its default comes from
            assert default == json.dumps(value), key
        assert meaning.startswith(model.model_fields[name].description.replace("|", "\\|")), key

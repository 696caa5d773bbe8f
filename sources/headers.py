"""What a data file holds, for the checks before start-up: the row counts the size rules
need (an ``.npz``'s ``.npy`` headers, a table's label and split columns; no features are
loaded), and an ``.npz``'s shape with every problem in it (its arrays are read once and
dropped; the data stage reads them again)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

from sources.npz import npz_problems, peek_npz_sizes
from sources.spec import SourceSpec
from sources.tables import peek_table_sizes


class FileShape(NamedTuple):
    """An ``.npz``'s rows (every split), features per row and classes (max label + 1)."""

    n_rows: int
    n_features: int
    n_classes: int


def is_npz(dataset: str) -> bool:
    """Whether ``dataset`` names an ``.npz`` file (else a table or a named dataset)."""
    return Path(dataset).suffix.lower() == ".npz"


def file_sizes(spec: SourceSpec) -> tuple[int, Optional[int]]:
    """Training-pool rows of the file ``spec.dataset`` and its own validation rows (None:
    it has none), from the ``.npz`` headers or the table's label and split columns.

    Raises:
        DataError: when the file is missing or unreadable, or lacks what sizes it.
    """
    if is_npz(spec.dataset):
        return peek_npz_sizes(Path(spec.dataset))
    return peek_table_sizes(Path(spec.dataset), spec.label_column, spec.test_fraction)


def file_shape(dataset: str) -> tuple[Optional[FileShape], list[str]]:
    """The shape of an ``.npz`` and every problem in it (``sources.npz.npz_problems``:
    missing or unpaired arrays, row and feature counts, NaN/inf or values beyond float32,
    labels that are not class indices, test labels that training never has), all at once;
    ``(None, [])`` for a table (the data stage checks it).
    """
    if not is_npz(dataset):
        return None, []
    arrays, problems = npz_problems(Path(dataset))
    if arrays is None or problems:
        return None, problems
    n_rows = sum(len(arrays[k]) for k in ("x_train", "x_valid", "x_test") if k in arrays)
    top = max(int(arrays[k].max()) for k in ("y_train", "y_valid", "y_test") if k in arrays)
    d = math.prod(arrays["x_train"].shape[1:])
    return FileShape(n_rows=n_rows, n_features=d, n_classes=top + 1), []

"""A CSV or Parquet table as a dataset: one row per example, numeric feature columns, a
label column (``data.label_column``) and, optionally, a ``split`` column.

``split`` holds ``train``, ``valid`` or ``test`` per row. Without it, a class-stratified,
seeded (``data.subset_seed``) ``data.test_fraction`` of the rows is the test split and the
rest is the training pool. Read through pandas (Parquet through pyarrow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import DataError
from sources.checks import check_pairs, joined, source_problem, x_problems
from sources.fractions import fraction_count
from sources.labels import label_problems
from sources.sampling import stratified_subset

#: Values of a table's optional ``split`` column.
TABLE_SPLITS = ("train", "valid", "test")


def _read(path: Path, columns: Optional[list[str]] = None, nrows: Optional[int] = None):
    """The table (or some of its columns, or its first ``nrows`` rows) as a DataFrame."""
    import pandas as pd  # lazy: pandas costs a second to import

    problem = source_problem(path, "table")
    if problem:
        raise DataError(problem)
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path, columns=columns)
        return pd.read_csv(path, usecols=columns, nrows=nrows)
    except ValueError as exc:  # a column absent from usecols, bad types
        raise DataError(f"{path}: cannot read the table ({exc})") from exc
    except Exception as exc:  # pandas/pyarrow parser errors have no common base class
        raise DataError(f"{path} is not a readable {path.suffix[1:]} file ({exc})") from exc


def _columns(path: Path) -> list[str]:
    """Column names, from the Parquet schema or the CSV's first line."""
    problem = source_problem(path, "table")
    if problem:
        raise DataError(problem)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow's errors have no common base class
            raise DataError(f"{path} is not a readable parquet file ({exc})") from exc
    return [str(c) for c in _read(path, nrows=0).columns]


def _split_rows(path: Path, labels: np.ndarray, split: Optional[np.ndarray],
                test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split: from the ``split`` column, or a stratified test fraction."""
    if split is not None:
        unknown = sorted(set(split.tolist()) - set(TABLE_SPLITS))
        if unknown:
            raise DataError(f"{path}: column 'split' has value(s) {unknown}; use "
                            f"{', '.join(TABLE_SPLITS)}")  # fmt: skip
        rows = {s: np.flatnonzero(split == s) for s in TABLE_SPLITS}
        for s in ("train", "test"):
            if len(rows[s]) == 0:
                raise DataError(f"{path}: no row has split == '{s}'. Fix: mark some rows "
                                f"'{s}', or drop the split column")  # fmt: skip
        return rows if len(rows["valid"]) else {k: v for k, v in rows.items() if k != "valid"}
    if len(labels) < 2:
        raise DataError(f"{path} has {len(labels)} row(s): too small for a test split")
    n_test = min(fraction_count(test_fraction, len(labels)), len(labels) - 1)
    test = stratified_subset(labels, n_test, seed=seed)
    return {"train": np.setdiff1d(np.arange(len(labels)), test), "test": test}


def peek_table_sizes(path: Path, label_column: str, test_fraction: float
                     ) -> tuple[int, Optional[int]]:
    """Training-pool rows and the table's own validation rows (None: none), reading only
    the label and split columns (``read_table``'s arguments)."""
    path = Path(path)
    names = _columns(path)
    if label_column not in names:
        raise DataError(f"{path}: no column {label_column!r} (columns: "
                        f"{', '.join(map(str, names[:12]))}). Fix: --set "
                        "data.label_column=NAME")  # fmt: skip
    df = _read(path, [c for c in (label_column, "split") if c in names])
    split = df["split"].to_numpy(dtype=str) if "split" in df else None
    if split is None:
        n = len(df)
        return n - min(fraction_count(test_fraction, n), max(n - 1, 0)), None
    n_valid = int((split == "valid").sum())
    return int((split == "train").sum()), n_valid or None


def read_table(path: Path, label_column: str, test_fraction: float, seed: int
               ) -> tuple[dict[str, np.ndarray], dict]:
    """Read and validate a table.

    Args:
        path: The CSV or Parquet file (``data.dataset``).
        label_column: The column of class indices (``data.label_column``).
        test_fraction: The test split's share of the rows when the table has no ``split``
            column (``data.test_fraction``).
        seed: The seed of that stratified test split (``data.subset_seed``).

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"[, "x_valid", "y_valid"]}`` (features
        (N, D) in column order, labels int64 (N,)), and the settings that shaped the split
        (for the data digest).

    Raises:
        DataError: naming the file and the column at fault, and the fix.
    """
    path = Path(path)
    df = _read(path)
    if label_column not in df.columns:
        raise DataError(f"{path}: no column {label_column!r} (columns: "
                        f"{', '.join(map(str, list(df.columns)[:12]))}). Fix: --set "
                        "data.label_column=NAME")  # fmt: skip
    split = df.pop("split").to_numpy(dtype=str) if "split" in df.columns else None
    labels = df.pop(label_column)
    bad = [str(c) for c in df.columns if df[c].dtype.kind not in "iuf"]
    if bad:
        raise DataError(f"{path}: column(s) {bad} are not numeric; features must be numbers. "
                        "Fix: encode or drop them")  # fmt: skip
    if df.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides {label_column!r}")
    x = df.to_numpy()  # (N, D)
    # checked before splitting, so that a position is the table's row, not a split's
    csv = path.suffix.lower() == ".csv"
    problems = x_problems(x, "the table", path, where=lambda row, col: (
        f"row {row}" + (f" (line {row + 2} of the file)" if csv else "")
        + f", column {df.columns[col]!r}"))
    problems += label_problems(labels.to_numpy(), f"label column {label_column!r}", path)
    if problems:
        raise DataError(joined(problems))
    y = labels.to_numpy().astype(np.int64)  # (N,)
    rows = _split_rows(path, y, split, test_fraction, seed)
    arrays = {f"{a}_{s}": (x if a == "x" else y)[idx] for s, idx in rows.items() for a in "xy"}
    settings = ({"test_split": "column"} if split is not None else
                {"test_split": "stratified", "test_fraction": test_fraction,
                 "test_seed": seed})  # fmt: skip
    return check_pairs(path, arrays), settings

"""What every data file must be, whatever its kind: a readable file, numeric features
within float32's range, paired ``x_<split>``/``y_<split>`` arrays with one label per row and
the same features in every split. Each rule returns its problems as messages naming the
file, the array or column and the fix, so that all of them can be reported together.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from runtime.errors import DataError
from sources.labels import label_problems, split_label_problems

FLOAT32_MAX = float(np.finfo(np.float32).max)


def source_problem(path: Path, kind: str) -> Optional[str]:
    """Why ``path`` cannot be read as a data file (None: it is a file): a directory, a
    symbolic link that loops or points nowhere, or nothing at all.

    Args:
        path: The dataset as named.
        kind: What it should be, e.g. ``npz file`` or ``table``.
    """
    if path.is_file():
        return None
    if path.is_dir():
        return f"{path} is a directory, not a file: name the {kind} inside it"
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop so
            return f"{path} is a symbolic link that loops back on itself: point it at the {kind}"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return (f"{path} is a symbolic link that loops back on itself: point it at "
                        f"the {kind}")
        return (f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: "
                f"point it at the {kind}")
    return f"{kind} not found: {path}. Fix: check the dataset path"


def x_problems(x: np.ndarray, name: str, path: Path,
               where: Optional[Callable[[int, int], str]] = None) -> list[str]:
    """Features: numeric, (N, ...) with N >= 1, finite, within float32's range (the model,
    and the registered model, compute in float32; larger values become inf there).

    Args:
        x: The features as stored.
        name: What they are called in the file, e.g. ``x_train``.
        path: The file, for the message.
        where: How a position (row, column) reads in the message (a table's row and
            column name); default ``[row, col]`` of ``name``.
    """
    if x.dtype.kind not in "iuf":  # bool, object, str, complex: no
        return [f"{path}: {name} has dtype {x.dtype}; it must be numeric (int or float)"]
    if x.ndim < 2:
        return [f"{path}: {name} must be 2-D (N, D), got shape {x.shape}"]
    if x.size == 0:
        return [f"{path}: {name} is empty (shape {x.shape})"]
    if x.dtype.kind != "f":
        return []
    x = x.reshape(len(x), -1)
    problems = []
    with np.errstate(invalid="ignore"):
        big = np.abs(x) > FLOAT32_MAX  # NaN compares False
    for bad, what, fix in ((~np.isfinite(x), "NaN/inf value(s)", "fill or drop those rows"),
                           (big, f"value(s) beyond float32's range (±{FLOAT32_MAX:.3g})",
                            "rescale the features (e.g. standardise them) before saving")):
        if bad.any():
            (row, col), count = np.argwhere(bad)[0], int(bad.sum())
            at = where(row, col) if where else f"[{row}, {col}]"
            problems.append(f"{path}: {name} has {count} {what}, first at {at} "
                            f"(value {x[row, col]:g}): {fix}")
    return problems


def pair_problems(path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """Every problem of the ``x_<split>``/``y_<split>`` pairs, together: each array on its
    own, row counts, feature widths, and the labels across splits
    (``sources.labels``)."""
    problems: list[str] = []
    good_labels = {}
    width = None
    for split in [s for s in ("train", "valid", "test") if f"x_{s}" in arrays]:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        x_bad, y_bad = x_problems(x, f"x_{split}", path), label_problems(y, f"y_{split}", path)
        problems += x_bad + y_bad
        if x.ndim >= 1 and y.ndim >= 1 and len(x) != len(y):
            problems.append(f"{path}: x_{split} has {len(x)} rows but y_{split} has {len(y)} "
                            f"labels: give one label per row")
        d = int(np.prod(x.shape[1:])) if x.ndim >= 2 else None
        if split == "train":
            width = d
        elif d is not None and width is not None and d != width:
            problems.append(f"{path}: x_train has {width} features per row, x_{split} {d}: "
                            "every split needs the same features")
        if not y_bad:
            good_labels[f"y_{split}"] = y.astype(np.int64)
    if "y_train" in good_labels:
        problems += split_label_problems(good_labels, path)
    return problems


def check_pairs(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The validated pairs: x flattened to (N, D), y int64 (N,).

    Raises:
        DataError: listing every problem :func:`pair_problems` finds.
    """
    problems = pair_problems(path, arrays)
    if problems:
        raise DataError(joined(problems))
    return {k: (np.ascontiguousarray(v.reshape(len(v), -1)) if k[0] == "x"
                else v.astype(np.int64)) for k, v in arrays.items()}


def joined(problems: list[str]) -> str:
    """One problem as it is; several as a list under a count."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the data:\n" + "\n".join(f"  - {p}" for p in problems)

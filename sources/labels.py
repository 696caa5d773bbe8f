"""What a dataset's labels must be: class indices 0..n_classes-1, the same classes in every
split. One owner for the data stage (which refuses) and the preflight (which reports before
any run): every rule returns its problems as messages naming the file, the array, the value
and the fix, so that all of them can be reported together.

The classifier gets ``max(label) + 1`` outputs (``tasks.data.DataBundle.n_classes``), so a
label is an index into them, not a name: an id (one label of 2^40 once asked for terabytes),
gaps in the numbering (labels {3, 7}: 8 outputs, 6 never trained) and a single class (0 %
error, learned from nothing) are found here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

RENUMBER = ("renumber them over all splits together, e.g. "
            "y = np.unique(y_all, return_inverse=True)[1]")


def _rows(mask: np.ndarray) -> str:
    """The first rows where ``mask`` holds, e.g. ``rows 3, 17 (and 4 more)``."""
    rows = np.flatnonzero(mask)
    shown = ", ".join(map(str, rows[:3]))
    more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def label_problems(y: np.ndarray, name: str, path: Path) -> list[str]:
    """One split's labels: numeric, 1-D (N,), non-empty, finite, integer-valued, >= 0.

    Args:
        y: The labels as stored (any dtype).
        name: What they are called in the file, e.g. ``y_train``.
        path: The file, for the message.
    """
    if y.dtype.kind not in "iuf":
        return [f"{path}: {name} has dtype {y.dtype}; labels must be integers (class "
                "indices 0..n_classes-1): store them as int64"]
    if y.ndim != 1 or y.size == 0:
        return [f"{path}: {name} must be 1-D (N,) and non-empty, got shape {y.shape}: "
                "store one class index per row"]
    problems = []
    finite = np.isfinite(y) if y.dtype.kind == "f" else np.ones(y.shape, bool)
    if not finite.all():
        problems.append(f"{path}: {name} has NaN/inf at {_rows(~finite)}: every row needs a "
                        "class index; fill or drop those rows")
    y = np.where(finite, y, 0)
    fractional = y != np.round(y) if y.dtype.kind == "f" else np.zeros(y.shape, bool)
    if fractional.any():
        first = y[np.flatnonzero(fractional)[0]]
        problems.append(f"{path}: {name} has non-integer labels (e.g. {first:g}) at "
                        f"{_rows(fractional)}: labels are class indices 0..n_classes-1; "
                        "round them or " + RENUMBER)
    negative = y < 0
    if negative.any():
        problems.append(f"{path}: {name} has negative labels (e.g. {y[negative].min():g}) at "
                        f"{_rows(negative)}: labels are class indices 0..n_classes-1; "
                        + RENUMBER)
    return problems


def split_label_problems(labels: Mapping[str, np.ndarray], path: Path) -> list[str]:
    """Labels across splits (each already valid on its own, int64): the other splits'
    classes all occur in ``y_train``, and the largest label is an index, not an id.

    Args:
        labels: ``{"y_train": …, "y_test": …[, "y_valid": …]}``, int64 (N,) each.
        path: The file, for the message.
    """
    train = np.unique(labels["y_train"])
    problems = []
    for name, y in labels.items():
        unseen = np.setdiff1d(np.unique(y), train)
        if name != "y_train" and unseen.size:
            problems.append(
                f"{path}: {name} holds label(s) {_listed(unseen)} that y_train never has "
                f"(y_train's classes: {class_set_text(train)}): the classifier cannot learn "
                f"them; add training rows of those classes, or drop those {name} rows")
    n_labelled = sum(len(y) for y in labels.values())
    top, name = max((int(y.max()), name) for name, y in labels.items())
    if top >= n_labelled:  # more outputs than labelled rows: ids, not class indices
        problems.append(
            f"{path}: {name} holds the label {top}, but the file has only {n_labelled} "
            "labelled rows: labels must be class indices 0..n_classes-1 (the classifier "
            f"gets max(label)+1 = {top + 1} outputs); {RENUMBER}")
    return problems


def label_warnings(labels: Mapping[str, np.ndarray], source: str) -> list[str]:
    """Label sets that train but mean little: a single class, or gaps in the numbering.

    Args:
        labels: Every split's labels, int64 (N,) each.
        source: The dataset, for the message.
    """
    classes = np.unique(np.concatenate(list(labels.values())))
    if len(classes) == 1:
        return [f"{source}: every label is {classes[0]}: a single class, which the "
                "classifier predicts without learning anything (0 % error is chance "
                "level); the model will not be registered"]
    missing = int(classes[-1]) + 1 - len(classes)
    if missing:
        return [f"{source}: the labels are {class_set_text(classes)}: the classifier gets "
                f"{int(classes[-1]) + 1} outputs, {missing} of them for classes no row has; "
                + RENUMBER]
    return []


def _listed(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def class_set_text(classes: np.ndarray) -> str:
    """The sorted classes as text: ``0..9`` when contiguous, else ``3, 7`` (at most 10
    listed, then the count): the MLflow param ``data.classes``."""
    classes = np.unique(classes)
    lo, hi = int(classes[0]), int(classes[-1])
    if len(classes) > 2 and hi - lo + 1 == len(classes):
        return f"{lo}..{hi}"
    return _listed(classes)

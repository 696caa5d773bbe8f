"""A user's own data: ``.npz`` arrays, or a CSV / Parquet table with a label column.

Each kind has a reader (validates everything, names the file and the array or column at
fault) and a peek (sizes from the file's header, or one column, without loading features),
so that size rules are checked before any server starts.
"""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from runtime.errors import DataError
from tasks.data_labels import label_problems, split_label_problems

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_VALID_KEYS = ("x_valid", "y_valid")
TABLE_SUFFIXES = (".csv", ".parquet")
#: Values of a table's optional ``split`` column.
TABLE_SPLITS = ("train", "valid", "test")
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
    (``tasks.data_labels``)."""
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


def npz_problems(path: Path) -> tuple[Optional[dict[str, np.ndarray]], list[str]]:
    """Read an ``.npz`` and find every problem in it at once.

    Returns:
        The arrays as stored (None when they cannot be read), and the problems: missing or
        unpaired arrays, then :func:`pair_problems`.
    """
    path = Path(path)
    problem = source_problem(path, ".npz file")
    if problem:
        return None, [problem]
    try:
        with np.load(path, allow_pickle=False) as npz:
            present = [k for k in NPZ_KEYS + NPZ_VALID_KEYS if k in npz.files]
            arrays = {k: npz[k] for k in present}
    except ValueError as exc:  # object arrays refused by allow_pickle=False, bad headers
        return None, [f"{path}: cannot read arrays ({exc}); store plain numeric arrays"]
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return None, [f"{path} is not a readable .npz file ({exc})"]
    problems = []
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        problems.append(f"{path}: missing array(s) {', '.join(missing)}; an .npz needs "
                        f"{', '.join(NPZ_KEYS)} (and optionally x_valid, y_valid)")
    for x, y in (("x_train", "y_train"), ("x_test", "y_test"), NPZ_VALID_KEYS):
        if (x in arrays) != (y in arrays):
            have, lack = (x, y) if x in arrays else (y, x)
            arrays.pop(have)  # its pair is missing: nothing to check it against
            if lack not in missing:
                problems.append(f"{path}: has {have} without {lack}; store both, or neither")
    if "x_train" not in arrays:
        return None, problems
    return arrays, problems + pair_problems(path, arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read and validate an ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` and,
    optionally, its own validation split ``x_valid``, ``y_valid``.

    ``x`` is (N, D), or (N, H, W, ...) which is flattened to (N, D); int or float, finite.
    ``y`` is (N,) integers (or integer-valued floats) in [0, n_classes).

    Raises:
        DataError: naming the file, and every offending array and its fix.
    """
    arrays, problems = npz_problems(Path(path))
    if problems:
        raise DataError(joined(problems))
    return check_pairs(Path(path), arrays)


def load_npz_raw(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`read_npz`'s x_train (N, D), y_train int64 (N,), x_test (M, D), y_test (M,)."""
    a = read_npz(path)
    return a["x_train"], a["y_train"], a["x_test"], a["y_test"]


def npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``name`` in an open ``.npz``, from its ``.npy`` header only."""
    with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)  # (3, 0) has 2.0's layout
        shape, _, dtype = read(f)  # (shape, fortran_order, dtype)
    return tuple(shape), dtype


def _npy_rows(zf: zipfile.ZipFile, name: str, path: Path) -> int:
    """Rows of one array in an open ``.npz``, read from its ``.npy`` header only."""
    shape, _ = npy_header(zf, name)
    if len(shape) < 2:
        raise DataError(f"{path}: {name} must be 2-D (N, D), got shape {shape}")
    return int(shape[0])


def peek_npz_sizes(path: Path) -> tuple[int, Optional[int]]:
    """Rows of ``x_train`` and of ``x_valid`` (None when absent), from the headers only."""
    path = Path(path)
    problem = source_problem(path, ".npz file")
    if problem:
        raise DataError(problem)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "x_train.npy" not in names:
                raise DataError(f"{path}: missing array 'x_train'")
            n_valid = _npy_rows(zf, "x_valid", path) if "x_valid.npy" in names else None
            return _npy_rows(zf, "x_train", path), n_valid
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc


def peek_npz_train_size(path: Path) -> int:
    """Rows of ``x_train`` in an ``.npz``, read from its ``.npy`` header; no array is loaded."""
    return peek_npz_sizes(path)[0]

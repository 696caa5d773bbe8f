"""A user's ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` and, optionally, its
own validation split ``x_valid``, ``y_valid``.

A reader (validates everything, names the file and the array at fault) and a peek (row
counts from the ``.npy`` headers, without loading any array), so that size rules are
checked before any server starts.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import DataError
from sources.checks import check_pairs, joined, pair_problems, source_problem

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_VALID_KEYS = ("x_valid", "y_valid")


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

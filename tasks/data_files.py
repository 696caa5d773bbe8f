"""A user's own data: ``.npz`` arrays, or a CSV / Parquet table with a label column.

Each kind has a reader (validates everything, names the file and the array or column at
fault) and a peek (sizes from the file's header, or one column, without loading features),
so that size rules are checked before any server starts.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import DataError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_VALID_KEYS = ("x_valid", "y_valid")
TABLE_SUFFIXES = (".csv", ".parquet")
#: Values of a table's optional ``split`` column.
TABLE_SPLITS = ("train", "valid", "test")


def check_x(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Validate features and flatten trailing dims: (N, ...) -> (N, D)."""
    if x.dtype.kind not in "iuf":  # bool, object, str, complex: no
        raise DataError(f"{path}: {name} has dtype {x.dtype}; it must be numeric (int or float)")
    if x.ndim < 2:
        raise DataError(f"{path}: {name} must be 2-D (N, D), got shape {x.shape}")
    if x.size == 0:
        raise DataError(f"{path}: {name} is empty (shape {x.shape})")
    x = np.ascontiguousarray(x.reshape(len(x), -1))
    bad = ~np.isfinite(x) if x.dtype.kind == "f" else np.zeros(0, bool)
    if bad.any():
        (row, col), count = np.argwhere(bad)[0], int(bad.sum())
        raise DataError(f"{path}: {name} has {count} NaN/inf value(s), first at [{row}, {col}]")
    return x


def check_y(y: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Validate labels: 1-D, integer-valued, non-negative -> int64 (N,)."""
    if y.dtype.kind not in "iuf":
        raise DataError(f"{path}: {name} has dtype {y.dtype}; labels must be integers")
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"{path}: {name} must be 1-D (N,) and non-empty, got shape {y.shape}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"{path}: {name} has non-integer values; labels must be integers")
    if y.min() < 0:
        raise DataError(f"{path}: {name} has label {y.min()}; labels must lie in [0, n_classes)")
    return y.astype(np.int64)


def check_pairs(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate ``x_<split>``/``y_<split>`` pairs: counts, feature widths, label range.

    n_classes = max(y_train) + 1; every other split's labels must lie below it.
    """
    out = {}
    for split in [s for s in ("train", "valid", "test") if f"x_{s}" in arrays]:
        x = out[f"x_{split}"] = check_x(arrays[f"x_{split}"], f"x_{split}", path)
        y = out[f"y_{split}"] = check_y(arrays[f"y_{split}"], f"y_{split}", path)
        if len(x) != len(y):
            raise DataError(
                f"{path}: label/image count mismatch: x_{split} has {len(x)} rows but "
                f"y_{split} has {len(y)} labels"
            )
        if split != "train":
            if x.shape[1] != out["x_train"].shape[1]:
                raise DataError(f"{path}: x_train has {out['x_train'].shape[1]} features, "
                                f"x_{split} {x.shape[1]}")  # fmt: skip
            if y.max() > out["y_train"].max():
                raise DataError(f"{path}: y_{split} has label {y.max()} outside "
                                f"[0, {out['y_train'].max() + 1})")  # fmt: skip
    return out


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read and validate an ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` and,
    optionally, its own validation split ``x_valid``, ``y_valid``.

    ``x`` is (N, D), or (N, H, W, ...) which is flattened to (N, D); int or float, finite.
    ``y`` is (N,) integers (or integer-valued floats) in [0, n_classes).

    Raises:
        DataError: naming the file and the offending array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}. Fix: check the dataset path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            valid = [k for k in NPZ_VALID_KEYS if k in npz.files]
            arrays = {k: npz[k] for k in NPZ_KEYS + tuple(valid) if k not in missing}
    except ValueError as exc:  # object arrays refused by allow_pickle=False, bad headers
        raise DataError(f"{path}: cannot read arrays ({exc}); store plain numeric arrays") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; it needs {list(NPZ_KEYS)}")
    if len(valid) == 1:
        raise DataError(f"{path}: has {valid[0]} without its pair; store both x_valid and "
                        "y_valid, or neither")  # fmt: skip
    return check_pairs(path, arrays)


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
    if not path.is_file():
        raise DataError(f"npz file not found: {path}. Fix: check the dataset path")
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

"""The data stage: fetch and verify MNIST (or read a user's ``.npz``), split, normalise, digest.

Plain functions first (testable without Prefect), the Prefect task last. The LAST ``n_valid``
examples of the training pool are the validation split, as in the reference tutorial (MNIST:
50k train / 10k valid from the official 60k; test = the official 10k). Normalisation
statistics come from the training split only, after any ``n_train`` subset.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import DataConfig
from tasks.errors import DataError

#: True SHA-256 of the raw files (``MNIST/SHA256SUMS`` in the shared data folder).
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
#: Sizes in bytes: IDX header (16 or 8 bytes) + 784 bytes per image or 1 per label.
MNIST_SIZES: dict[str, int] = dict(zip(MNIST_SHA256, (47_040_016, 60_008, 7_840_016, 10_008)))
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SPLITS = ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test")
_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, memoised per process on (resolved path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256_MEMO[key] = h.hexdigest()
    return _SHA256_MEMO[key]


def verify_mnist(root: Path) -> None:
    """Check the four raw MNIST files under ``root/MNIST/raw`` against :data:`MNIST_SHA256`.

    Raises:
        DataError: naming every missing file, or every file whose SHA-256 does not match
            (with expected and found sums and the size), and how to fix it.
    """
    raw = Path(root) / "MNIST" / "raw"  # torchvision's layout
    missing = [str(raw / name) for name in MNIST_SHA256 if not (raw / name).is_file()]
    if missing:
        raise DataError(
            f"MNIST file(s) missing: {', '.join(missing)}. Fix: put the four raw files in {raw}, "
            "point --data-dir / LAYERWISE_DATA_DIR at the folder that holds MNIST/raw, or "
            "enable download (download=True)."
        )
    bad = []
    for name, expected in MNIST_SHA256.items():
        found = sha256_file(raw / name)
        if found != expected:
            bad.append(
                f"{raw / name} (expected sha256 {expected}, found {found}; size "
                f"{(raw / name).stat().st_size} bytes, expected {MNIST_SIZES[name]})"
            )
    if bad:
        raise DataError(
            f"MNIST file(s) corrupt or truncated: {'; '.join(bad)}. Fix: delete the file and "
            "re-download it (download=True), or restore it from a good copy."
        )


def load_mnist_raw(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read MNIST from ``cfg.data_dir``; download first if a file is absent and allowed.

    Returns:
        x_pool uint8 (60000, 784), y_pool int64 (60000,), x_test uint8 (10000, 784),
        y_test int64 (10000,).
    """
    from torchvision.datasets import MNIST  # lazy: importing torchvision costs seconds

    raw = Path(cfg.data_dir) / "MNIST" / "raw"
    if cfg.download and not all((raw / name).is_file() for name in MNIST_SHA256):
        try:
            MNIST(root=str(cfg.data_dir), train=True, download=True)  # fetches all four files
        except Exception as exc:  # no network, mirrors down, bad archive
            raise DataError(
                f"downloading MNIST into {raw} failed ({exc}). Fix: put the four raw files "
                "there by hand, or point --data-dir / LAYERWISE_DATA_DIR at a copy."
            ) from exc
    verify_mnist(cfg.data_dir)  # always, downloaded or not
    out = []
    for train in (True, False):
        ds = MNIST(root=str(cfg.data_dir), train=train, download=False)
        # (N, 28, 28) uint8 -> (N, 784); targets (N,) int64
        out += [ds.data.reshape(len(ds.data), -1).numpy(), ds.targets.numpy().astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def _check_x(x: np.ndarray, name: str, path: Path) -> np.ndarray:
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


def _check_y(y: np.ndarray, name: str, path: Path) -> np.ndarray:
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


def load_npz_raw(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate an ``.npz`` holding ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    ``x`` is (N, D), or (N, H, W, ...) which is flattened to (N, D); int or float, finite.
    ``y`` is (N,) integers (or integer-valued floats) in [0, n_classes), with
    n_classes = max(y_train) + 1.

    Returns:
        x_train (N, D), y_train int64 (N,), x_test (M, D), y_test int64 (M,).

    Raises:
        DataError: naming the file and the offending array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}. Fix: check the dataset path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            arrays = {k: npz[k] for k in NPZ_KEYS if k not in missing}
    except ValueError as exc:  # object arrays refused by allow_pickle=False, bad headers
        raise DataError(f"{path}: cannot read arrays ({exc}); store plain numeric arrays") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; it needs {list(NPZ_KEYS)}")
    out = []
    for split in ("train", "test"):
        x = _check_x(arrays[f"x_{split}"], f"x_{split}", path)
        y = _check_y(arrays[f"y_{split}"], f"y_{split}", path)
        if len(x) != len(y):
            raise DataError(
                f"{path}: label/image count mismatch: x_{split} has {len(x)} rows but "
                f"y_{split} has {len(y)} labels"
            )
        out += [x, y]
    x_tr, y_tr, x_te, y_te = out
    if x_tr.shape[1] != x_te.shape[1]:
        raise DataError(f"{path}: x_train has {x_tr.shape[1]} features, x_test {x_te.shape[1]}")
    if y_te.max() > y_tr.max():  # n_classes = max(y_train) + 1
        raise DataError(f"{path}: y_test has label {y_te.max()} outside [0, {y_tr.max() + 1})")
    return x_tr, y_tr, x_te, y_te


def peek_npz_train_size(path: Path) -> int:
    """Rows of ``x_train`` in an ``.npz``, read from its ``.npy`` header; no array is loaded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}. Fix: check the dataset path")
    try:
        with zipfile.ZipFile(path) as zf, zf.open("x_train.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)  # (3, 0) has 2.0's layout
            shape = read(f)[0]  # (shape, fortran_order, dtype)
    except KeyError as exc:
        raise DataError(f"{path}: missing array 'x_train'") from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc
    if len(shape) < 2:
        raise DataError(f"{path}: x_train must be 2-D (N, D), got shape {shape}")
    return int(shape[0])


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded, class-stratified subset of exactly ``n`` indices into ``y``, sorted.

    Class c gets n * count_c / N examples, rounded by largest remainder so the total is n;
    when n >= the number of classes present, each present class gets at least one.
    """
    y = np.asarray(y)
    if not 1 <= n <= len(y):
        raise DataError(f"data.n_train={n} is outside [1, {len(y)}] training examples")
    counts = np.bincount(y)  # (C,)
    quota = n * counts / len(y)
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")  # largest remainder first
    alloc[order[: n - alloc.sum()]] += 1
    if n >= np.count_nonzero(counts):
        for c in np.flatnonzero((counts > 0) & (alloc == 0)):
            alloc[np.argmax(alloc)] -= 1  # one from the largest class, which has >= 2
            alloc[c] = 1
    rng = np.random.Generator(np.random.PCG64(seed))
    picks = [rng.choice(np.flatnonzero(y == c), k, replace=False) for c, k in enumerate(alloc)]
    return np.sort(np.concatenate(picks))


def normalize(
    x_train: np.ndarray, x_valid: np.ndarray, x_test: np.ndarray, method: str, zca_epsilon: float
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Normalise three (N, D) splits with statistics from ``x_train`` only.

    - ``unit``: uint8 -> x / 255. Any other dtype is min-max scaled by the training split's
      global min and max; valid and test are then clipped to [0, 1]. Stats ``low``, ``high``.
    - ``standardize``: (x - mean) / std per feature; constant features (many MNIST border
      pixels) get std 1, so they map to 0 instead of NaN. Stats ``mean``, ``std`` (D,).
    - ``zca``: scale as ``unit``, centre on the training mean, multiply by
      W = U diag(1 / sqrt(S + eps)) U^T, where U S U^T is the training covariance (1/(N-1)),
      eigendecomposed in float64. Stats ``mean`` (D,), ``zca_matrix`` (D, D), ``low``, ``high``.

    Returns:
        [x_train, x_valid, x_test] as float32 (N, D), and the stats as float64 arrays.
    """
    splits = (x_train, x_valid, x_test)
    if method == "standardize":
        mean = x_train.mean(axis=0, dtype=np.float64)  # (D,)
        std = x_train.std(axis=0, dtype=np.float64)  # (D,)
        std[(std == 0) | (x_train.max(axis=0) == x_train.min(axis=0))] = 1.0
        ft = np.float32 if x_train.dtype.itemsize <= 2 else np.float64  # uint8: float32 is exact
        m, inv = mean.astype(ft), (1.0 / std).astype(ft)
        return [((x.astype(ft) - m) * inv).astype(np.float32) for x in splits], {
            "mean": mean, "std": std}  # fmt: skip
    if method not in ("unit", "zca"):
        raise DataError(f"unknown normalization {method!r}; use 'unit', 'standardize' or 'zca'")
    if x_train.dtype == np.uint8:
        low, high = 0.0, 255.0
        xs = [x.astype(np.float32) / np.float32(255) for x in splits]  # exact rounding
    else:
        low, high = float(x_train.min()), float(x_train.max())
        xs = [(x.astype(np.float64) - low) / ((high - low) or 1.0) for x in splits]
        xs = [(x if i == 0 else np.clip(x, 0.0, 1.0)).astype(np.float32) for i, x in enumerate(xs)]
    stats = {"low": np.float64(low), "high": np.float64(high)}
    if method == "unit":
        return xs, stats
    xc = xs[0].astype(np.float64)  # (N, D)
    mean = xc.mean(axis=0)  # (D,)
    xc -= mean
    cov = xc.T @ xc / max(len(xc) - 1, 1)  # (D, D)
    s, u = np.linalg.eigh(cov)  # tiny negative eigenvalues are round-off: clip them
    w = (u / np.sqrt(np.clip(s, 0.0, None) + zca_epsilon)) @ u.T  # (D, D), symmetric
    w32, m32 = w.astype(np.float32), mean.astype(np.float32)
    xs = [(x - m32) @ w32 for x in xs]  # (N, D) @ (D, D) -> (N, D); float32 halves the time
    return xs, {**stats, "mean": mean, "zca_matrix": w}


def data_digest(splits: dict[str, np.ndarray], settings: dict) -> str:
    """SHA-256 over the raw split arrays (dtype, shape, little-endian C-order bytes, in
    :data:`SPLITS` order) and the canonical JSON of ``settings``. No hash(), no pickle."""
    h = hashlib.sha256(b"layerwise-data-v1\n")
    for name in SPLITS:
        a = np.ascontiguousarray(splits[name])
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\n")
        h.update(memoryview(a).cast("B"))
    h.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class DataBundle:
    """The data stage's output: float32 (N, D) / int64 (N,) CPU tensors and their provenance."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_features: int
    n_classes: int
    image_shape: Optional[tuple[int, int]]
    source: str
    normalization: str
    norm_stats: dict[str, torch.Tensor]
    digest: str
    zca_epsilon: Optional[float] = None  # set only when normalization == "zca"

    def summary(self) -> dict:
        """JSON-friendly description for logging, with per-split class counts."""
        ys = {"train": self.y_train, "valid": self.y_valid, "test": self.y_test}
        out = {"source": self.source, **{f"n_{k}": len(y) for k, y in ys.items()}}
        out |= {"n_features": self.n_features, "n_classes": self.n_classes}
        out |= {"normalization": self.normalization, "digest": self.digest}
        if self.normalization == "zca":
            out["zca_epsilon"] = self.zca_epsilon
        for k, y in ys.items():  # (n_classes,) examples per class
            out[f"class_counts_{k}"] = torch.bincount(y, minlength=self.n_classes).tolist()
        return out


def load_data(cfg: DataConfig) -> DataBundle:
    """Load, verify, split, subset, digest and normalise the data that ``cfg`` describes.

    Raises:
        DataError: on missing or corrupt files, malformed arrays, or splits that do not fit.
    """
    if cfg.is_mnist:
        x_pool, y_pool, x_test, y_test = load_mnist_raw(cfg)
        source, image_shape = "mnist", (28, 28)
    else:
        x_pool, y_pool, x_test, y_test = load_npz_raw(Path(cfg.dataset))
        source, side = cfg.dataset, math.isqrt(x_pool.shape[1])
        image_shape = (side, side) if side * side == x_pool.shape[1] else None
    n_fit = len(x_pool) - cfg.n_valid
    if n_fit < 1:
        raise DataError(
            f"data.n_valid={cfg.n_valid} leaves no training data: {source} has "
            f"{len(x_pool)} training examples. Fix: lower n_valid"
        )
    raw = {
        "x_train": x_pool[:n_fit], "y_train": y_pool[:n_fit],  # (n_fit, D), (n_fit,)
        "x_valid": x_pool[n_fit:], "y_valid": y_pool[n_fit:],  # the last n_valid examples
        "x_test": x_test, "y_test": y_test,
    }  # fmt: skip
    settings = {"normalization": cfg.normalization, "n_valid": cfg.n_valid, "n_train": cfg.n_train}
    if cfg.n_train is not None:
        if cfg.n_train > n_fit:
            raise DataError(
                f"data.n_train={cfg.n_train} is above the {n_fit} training examples that exist "
                f"({len(x_pool)} minus n_valid={cfg.n_valid})"
            )
        idx = stratified_subset(raw["y_train"], cfg.n_train, cfg.subset_seed)
        raw["x_train"], raw["y_train"] = raw["x_train"][idx], raw["y_train"][idx]
        settings["subset_seed"] = cfg.subset_seed  # the seed matters only with a subset
    if cfg.normalization == "zca":
        settings["zca_epsilon"] = cfg.zca_epsilon
    xs, stats = normalize(raw["x_train"], raw["x_valid"], raw["x_test"], cfg.normalization,
                          cfg.zca_epsilon)  # fmt: skip
    tensors = dict(zip(("x_train", "x_valid", "x_test"), map(torch.from_numpy, xs)))
    for name in ("y_train", "y_valid", "y_test"):
        tensors[name] = torch.from_numpy(np.ascontiguousarray(raw[name]))
    return DataBundle(
        **tensors,
        n_features=int(x_pool.shape[1]),
        n_classes=int(max(y_pool.max(), y_test.max())) + 1,
        image_shape=image_shape,
        source=source,
        normalization=cfg.normalization,
        norm_stats={k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in stats.items()},
        digest=data_digest(raw, settings),
        zca_epsilon=cfg.zca_epsilon if cfg.normalization == "zca" else None,
    )


@task(name="load-data", task_run_name="load-data", cache_policy=NO_CACHE, persist_result=False)
def load_data_task(cfg: DataConfig) -> DataBundle:
    """Prefect task over :func:`load_data`; never cached (tensors do not hash stably)."""
    return load_data(cfg)

"""The IDX family (MNIST, Fashion-MNIST, KMNIST): fetch through torchvision, verify, read.

All three share torchvision's on-disk layout (``ROOT/<Class>/raw/*-ubyte``) and MNIST's
split sizes: 60,000 training images and 10,000 test images of 28×28 uint8 pixels.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.errors import DataError

#: The four raw files of every IDX dataset, in torchvision's order.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip
#: Sizes in bytes: IDX header (16 or 8 bytes) + 784 bytes per image or 1 per label.
MNIST_SIZES: dict[str, int] = dict(zip(IDX_FILES, (47_040_016, 60_008, 7_840_016, 10_008)))
#: True SHA-256 of the raw MNIST files (``MNIST/SHA256SUMS`` in the shared data folder).
MNIST_SHA256: dict[str, str] = dict(zip(IDX_FILES, (
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
)))  # fmt: skip
#: Training pool and test sizes shared by the family.
IDX_TRAIN_POOL, IDX_TEST = 60_000, 10_000
_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class IdxSource:
    """One IDX dataset: torchvision's class name (= its folder) and its published sums.

    Args:
        folder: torchvision class name, also the folder under the data root.
        sha256: true SHA-256 of the raw files, when known (MNIST).
        gz_md5: MD5 of the published ``.gz`` archives, as torchvision checks them; used when
            no raw SHA-256 is known: the archive's MD5 is checked, then the raw file must be
            exactly the archive's decompressed content.
    """

    folder: str
    sha256: Optional[dict[str, str]] = None
    gz_md5: Optional[dict[str, str]] = None


IDX_SOURCES: dict[str, IdxSource] = {
    "mnist": IdxSource("MNIST", sha256=MNIST_SHA256),
    # MD5s from torchvision/datasets/mnist.py (FashionMNIST.resources, KMNIST.resources).
    "fashion-mnist": IdxSource("FashionMNIST", gz_md5=dict(zip(IDX_FILES, (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")))),
    "kmnist": IdxSource("KMNIST", gz_md5=dict(zip(IDX_FILES, (
        "bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134")))),
}  # fmt: skip


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


def _gz_problem(raw: Path, name: str, md5: str) -> Optional[str]:
    """None if ``name.gz`` has the published MD5 and decompresses to exactly ``name``."""
    gz = raw / f"{name}.gz"
    if not gz.is_file():
        return (f"{gz} is missing: without the published archive the raw file cannot be "
                "checked (keep the .gz files that torchvision downloads next to the raw ones)")
    found = hashlib.md5(gz.read_bytes()).hexdigest()
    if found != md5:
        return f"{gz} (expected md5 {md5}, found {found})"
    with gzip.open(gz, "rb") as f:
        inflated = hashlib.sha256(f.read()).hexdigest()  # <= 47 MB in memory
    if inflated != sha256_file(raw / name):
        return f"{raw / name} differs from the decompressed {gz.name}"
    return None


def verify_idx(dataset: str, root: Path) -> None:
    """Check the four raw files of ``dataset`` under ``root/<folder>/raw``.

    MNIST: against the true SHA-256 sums. Fashion-MNIST and KMNIST: the ``.gz`` archives
    against torchvision's MD5s, and each raw file against its decompressed archive.

    Raises:
        DataError: naming every missing or mismatching file and how to fix it.
    """
    src = IDX_SOURCES[dataset]
    raw = Path(root) / src.folder / "raw"  # torchvision's layout
    missing = [str(raw / name) for name in IDX_FILES if not (raw / name).is_file()]
    if missing:
        raise DataError(
            f"{src.folder} file(s) missing: {', '.join(missing)}. Fix: put the four raw files in "
            f"{raw}, point --data-dir / LAYERWISE_DATA_DIR at the folder that holds "
            f"{src.folder}/raw, or enable download (download=True)."
        )
    bad = []
    for name in IDX_FILES:
        if src.sha256 is not None:
            found = sha256_file(raw / name)
            if found != src.sha256[name]:
                size = (raw / name).stat().st_size
                bad.append(f"{raw / name} (expected sha256 {src.sha256[name]}, found {found}; "
                           f"size {size} bytes, expected {MNIST_SIZES[name]})")
        elif (problem := _gz_problem(raw, name, src.gz_md5[name])) is not None:
            bad.append(problem)
    if bad:
        raise DataError(
            f"{src.folder} file(s) corrupt or truncated: {'; '.join(bad)}. Fix: delete the "
            "file and re-download it (download=True), or restore it from a good copy."
        )


def verify_mnist(root: Path) -> None:
    """:func:`verify_idx` for MNIST."""
    verify_idx("mnist", root)


def load_idx_raw(
    dataset: str, data_dir: Path, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read an IDX dataset from ``data_dir``; download first if a file is absent and allowed.

    Args:
        dataset: a key of :data:`IDX_SOURCES`.
        data_dir: the torchvision root.
        download: fetch absent files through torchvision (which checks the archives' MD5s).

    Returns:
        x_pool uint8 (60000, 784), y_pool int64 (60000,), x_test uint8 (10000, 784),
        y_test int64 (10000,).
    """
    import torchvision.datasets as tvd  # lazy: importing torchvision costs seconds

    src = IDX_SOURCES[dataset]
    cls = getattr(tvd, src.folder)
    raw = Path(data_dir) / src.folder / "raw"
    if download and not all((raw / name).is_file() for name in IDX_FILES):
        try:
            cls(root=str(data_dir), train=True, download=True)  # fetches all four files
        except Exception as exc:  # no network, mirrors down, bad archive
            raise DataError(
                f"downloading {src.folder} into {raw} failed ({exc}). Fix: put the four raw "
                "files there by hand, or point --data-dir / LAYERWISE_DATA_DIR at a copy."
            ) from exc
    verify_idx(dataset, data_dir)  # always, downloaded or not
    out = []
    for train in (True, False):
        ds = cls(root=str(data_dir), train=train, download=False)
        # (N, 28, 28) uint8 -> (N, 784); targets (N,) int64
        out += [ds.data.reshape(len(ds.data), -1).numpy(), ds.targets.numpy().astype(np.int64)]
    return out[0], out[1], out[2], out[3]

"""The way into a data source for the data stage: its arrays before splitting, verified
(:func:`read_source`), the test split's features as stored (:func:`raw_test_features`) and
the place MLflow's dataset inputs name (:func:`source_location`).

Sources: the IDX family and the MNIST variants regenerated from it (``sources.idx``,
``sources.variants``), a user's ``.npz`` (``sources.npz``), CSV or Parquet
(``sources.tables``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sources.headers import is_npz
from sources.idx import IDX_SOURCES, load_idx_raw
from sources.npz import read_npz
from sources.spec import SourceSpec
from sources.tables import read_table
from sources.variants import VARIANTS, make_variant


def read_source(spec: SourceSpec) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of ``spec.dataset`` before splitting, verified, and the source's settings.

    Returns:
        ``{"x_pool", "y_pool", "x_test", "y_test"[, "x_valid", "y_valid"]}`` (features
        (N, D) as stored, labels int64 (N,)); the validation pair only when the file has
        its own. Settings: what besides the arrays shaped them (a variant's seed, a
        table's test split).

    Raises:
        DataError: on missing or corrupt files and malformed arrays, naming the fix.
    """
    settings: dict = {}
    if spec.dataset in IDX_SOURCES or spec.dataset in VARIANTS:
        base = spec.dataset if spec.dataset in IDX_SOURCES else "mnist"
        x_pool, y_pool, x_test, y_test = load_idx_raw(base, spec.data_dir, spec.download)
        if spec.dataset in VARIANTS:
            x_pool, x_test = make_variant(spec.dataset, x_pool, x_test, spec.variant_seed)
            settings = {"variant": spec.dataset, "variant_seed": spec.variant_seed}
        return {"x_pool": x_pool, "y_pool": y_pool, "x_test": x_test, "y_test": y_test}, settings
    if is_npz(spec.dataset):
        arrays = read_npz(Path(spec.dataset))
    else:
        arrays, settings = read_table(Path(spec.dataset), spec.label_column,
                                      spec.test_fraction, spec.subset_seed)
    arrays["x_pool"], arrays["y_pool"] = arrays.pop("x_train"), arrays.pop("y_train")
    return arrays, settings


def raw_test_features(spec: SourceSpec) -> np.ndarray:
    """The test split's features as the source stores them, before any normalisation
    (MNIST: uint8 (10000, 784)); the whole source is read (a variant regenerated) for them.
    """
    return read_source(spec)[0]["x_test"]


def source_location(spec: SourceSpec) -> str:
    """Where the data lies, as MLflow's dataset inputs name it: torchvision's raw folder for
    MNIST, else ``spec.dataset`` (a file's path, or a dataset's name)."""
    if spec.dataset == "mnist":
        return str(Path(spec.data_dir) / IDX_SOURCES["mnist"].folder / "raw")
    return spec.dataset

"""What the readers take from a data config. ``config.stages.DataConfig`` has every field;
the readers ask for these names only, so that they import no config."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class SourceSpec(Protocol):
    """The data config's fields that say which arrays a source yields.

    Args:
        dataset: A named dataset (``mnist``, ``mnist-rot``…) or the path of a file.
        data_dir: The torchvision root of the named datasets.
        download: Fetch a named dataset's absent files through torchvision.
        variant_seed: Seed of a regenerated MNIST variant.
        label_column: A table's column of class indices.
        test_fraction: A table's test share when it has no ``split`` column.
        subset_seed: Seed of that stratified test split.
    """

    dataset: str
    data_dir: Path
    download: bool
    variant_seed: int
    label_column: str
    test_fraction: float
    subset_seed: int

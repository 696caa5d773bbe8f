"""Model selection on the validation split: a hyperparameter factor of a grid (the masking
level ν of Vincent et al. 2010, Table 3) chosen per group on validation error, and the test
errors of both arms at the chosen value. The test split never enters the choice.

Plain functions on the ablation's tidy cell table (one row per cell: factors, ``init``,
``seed``, ``status``, ``val_error``, ``test_error``), like ``reports.stats``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from reports.stats import PRETRAINED, summarize

#: Columns of :func:`validation_means` after the group columns.
VALIDATION_COLUMNS = ("n", "val_mean", "chosen")


def validation_means(table: pd.DataFrame, by: Sequence[str], factor: str,
                     arm: str = PRETRAINED) -> pd.DataFrame:
    """Mean validation error of ``arm`` per group and value of ``factor``, with the choice.

    Only finished cells (``status == "ok"``) count. In each group of ``by`` (``factor``
    left out) the chosen value is the one with the lowest mean validation error over seeds;
    a tie goes to the smallest value. ``arm`` is the init whose errors decide: the
    pretrained one for a pretraining hyperparameter such as ν (a random-init twin does not
    depend on it).

    Args:
        table: One row per cell.
        by: The summary's group columns; ``factor`` among them or not.
        factor: The factor to choose, e.g. ``corruption_level``.
        arm: The ``init`` whose validation errors decide.

    Returns:
        One row per group and value of ``factor``: ``n`` seeds, ``val_mean`` and
        ``chosen`` (True on the chosen value's row).
    """
    groups = [c for c in by if c != factor]
    ok = table[(table["status"] == "ok") & (table["init"] == arm)]
    means = (ok.groupby([*groups, factor], dropna=False, sort=True)["val_error"]
             .agg(n="count", val_mean="mean").reset_index())
    means = means.sort_values([*groups, "val_mean", factor], kind="stable").reset_index(drop=True)
    means["chosen"] = ~means.duplicated(groups, keep="first") if groups else means.index == 0
    return means.sort_values([*groups, factor], kind="stable").reset_index(drop=True)


def select_on_validation(table: pd.DataFrame, by: Sequence[str], factor: str,
                         resamples: int = 10_000, level: float = 0.95, seed: int = 0
                         ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary (``reports.stats.summarize``) of the cells at each group's chosen value.

    Args:
        table: One row per cell.
        by: The summary's group columns.
        factor: The factor chosen on validation (see :func:`validation_means`).
        resamples: Bootstrap resamples of the summary's intervals.
        level: Their confidence level.
        seed: Their resampling seed.

    Returns:
        (the summary of the chosen cells, both arms, grouped by ``by`` with ``factor``
        showing the chosen value; the validation means behind the choice).
    """
    means = validation_means(table, by, factor)
    groups = [c for c in by if c != factor]
    chosen = means.loc[means["chosen"], [*groups, factor]]
    cells = table.merge(chosen, on=[*groups, factor], how="inner")
    summary = summarize(cells, selection_keys(by, factor), resamples=resamples, level=level,
                        seed=seed)
    return summary, means


def selection_keys(by: Sequence[str], factor: str) -> list[str]:
    """The group columns of the selection's summary: ``by``, with ``factor`` added if absent."""
    return list(by) if factor in by else [*by, factor]


def write_selection(out: Path, summary: pd.DataFrame, means: pd.DataFrame) -> dict[str, Path]:
    """``selection.csv`` (the chosen cells' summary) and ``validation.csv`` (the means)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"selection_csv": out / "selection.csv", "validation_csv": out / "validation.csv"}
    summary.to_csv(files["selection_csv"], index=False)
    means.to_csv(files["validation_csv"], index=False)
    return files


def format_validation(means: pd.DataFrame, factor: str) -> str:
    """The validation means as text (percent), the chosen value marked with ``*``."""
    view = means.assign(val_mean=[f"{100 * v:.2f}" for v in means["val_mean"]],
                        chosen=["*" if c else "" for c in means["chosen"]])
    return view.rename(columns={"val_mean": "val error %", factor: factor}).to_string(index=False)

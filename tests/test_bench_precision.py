"""The precision bench's verdict (``benchmarks.bench_precision.compare``): bf16-mixed passes a
group when the upper 95 % CI bound of bf16 − fp32 is at most half the seed spread, and fails
when it is worse by more; the pooled row gets no verdict (its spread mixes the groups)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """``benchmarks.bench_precision``: benchmarks/ is not an installed package (it runs as
    ``python -m benchmarks`` from the repository root), so the root goes on the path."""
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("benchmarks.bench_precision")


def _cells(shift: dict[str, float], seeds: int = 10) -> pd.DataFrame:
    """Cells of the precision grid: fp32 errors spread over seeds, bf16 = fp32 + shift."""
    rng = np.random.default_rng(0)
    rows = []
    for activation in ("relu", "sigmoid"):
        for arm in ("pretrained", "random"):
            base = 0.06 + 0.002 * rng.standard_normal(seeds)  # seed std ≈ 0.2 pp
            noise = 0.0001 * rng.standard_normal(seeds)
            for seed in range(seeds):
                for precision, error in (("fp32", base[seed]),
                                         ("bf16", base[seed] + shift[activation] + noise[seed])):
                    rows.append({"status": "ok", "variant": f"{activation}-{precision}",
                                 "activation": activation, "arm": arm, "seed": seed,
                                 "test_error": error, "train_seconds": 1.0})
    return pd.DataFrame(rows)


def test_better_or_equal_passes_and_worse_by_more_than_half_the_spread_fails(bench):
    rows = {r["group"]: r for r in bench.compare(_cells({"relu": -0.0008, "sigmoid": 0.002}))}
    assert rows["relu pretrained"]["noninferior"] and rows["relu random"]["noninferior"]
    for group in ("sigmoid pretrained", "sigmoid random"):  # +0.2 pp: about one seed std
        row = rows[group]
        assert row["diff_ci_high"] > bench.NONINFERIORITY_MARGIN * row["fp32_seed_std"]
        assert row["noninferior"] is False
    assert rows["all pairs"]["noninferior"] is None and rows["all pairs"]["n_pairs"] == 40

"""Statistics of the ablation summary, on synthetic tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from reports.stats import bootstrap_ci, describe, paired_differences, summarize, welch_t, wilcoxon_p


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    samples = rng.normal(loc=2.0, scale=3.0, size=(200, 30))  # 200 repetitions of n = 30
    covered = 0
    for i, x in enumerate(samples):
        lo, hi = bootstrap_ci(x, resamples=10_000, level=0.95, seed=i)
        assert lo < x.mean() < hi
        covered += lo <= 2.0 <= hi
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_ci_is_seeded_and_narrows_with_the_level():
    x = np.arange(20.0)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    lo95, hi95 = bootstrap_ci(x, level=0.95)
    lo50, hi50 = bootstrap_ci(x, level=0.50)
    assert lo95 < lo50 < x.mean() < hi50 < hi95
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_wilcoxon_exact_p_of_six_positive_differences():
    # All 6 signs positive: under H0 each of the 2^6 sign patterns is equally likely, and
    # only "all +" and "all -" are as extreme, so the two-sided exact p = 2/64.
    assert wilcoxon_p([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]) == pytest.approx(2 / 64)
    assert wilcoxon_p([-0.5, -1, -2, -3, -4, -5]) == pytest.approx(2 / 64)


def test_wilcoxon_matches_scipy_and_handles_degenerate_cases():
    d = np.random.default_rng(0).normal(0.3, 1.0, size=25)
    assert wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))


def test_welch_t_against_a_hand_computation():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0, 5.0])
    va, vb = 1.0, 5 / 3  # sample variances (ddof 1)
    se2 = va / 3 + vb / 4  # 1/3 + 5/12 = 3/4
    t = (2.0 - 3.5) / math.sqrt(se2)
    df = se2**2 / ((va / 3) ** 2 / 2 + (vb / 4) ** 2 / 3)
    p = 2 * sps.t.sf(abs(t), df)
    got_t, got_df, got_p = welch_t(a, b)
    assert (got_t, got_df, got_p) == pytest.approx((t, df, p))
    assert got_t == pytest.approx(-math.sqrt(3))  # -1.5 / sqrt(3/4)
    assert got_p == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert math.isnan(welch_t([1.0], b)[2])


def test_paired_differences_use_shared_seeds_only():
    pre = pd.Series([0.1, 0.2, 0.3], index=[0, 1, 2])
    rnd = pd.Series([0.5, 0.7, 0.9], index=[2, 1, 5])
    d = paired_differences(pre, rnd)
    assert list(d.index) == [1, 2]
    assert d.to_numpy() == pytest.approx([0.2 - 0.7, 0.3 - 0.5])


def test_describe_known_values():
    out = describe([1.0, 2.0, 3.0, 10.0], resamples=1000)
    assert out["n"] == 4 and out["mean"] == 4.0 and out["median"] == 2.5
    assert out["std"] == pytest.approx(np.std([1, 2, 3, 10], ddof=1))
    assert out["ci_low"] >= 1.0 and out["ci_high"] <= 10.0


def _table() -> pd.DataFrame:
    """depth 1-2 x width 8/16 x {pretrained, tutorial, he} x 6 seeds with known errors:
    pretrained = 0.10 + 0.01·depth + seed/1000, random = pretrained + 0.02 (he: + 0.05)."""
    rows = []
    for depth in (1, 2):
        for width in (8, 16):
            for seed in range(6):
                base = 0.10 + 0.01 * depth + seed / 1000
                for init, gap in (("pretrained", 0.0), ("tutorial", 0.02), ("he", 0.05)):
                    rows.append({"depth": depth, "width": width, "init": init, "seed": seed,
                                 "status": "ok", "test_error": base + gap})
    return pd.DataFrame(rows)


def test_summary_puts_each_factor_combination_in_its_own_row():
    table = _table()
    s = summarize(table, ["depth", "width"], resamples=500)
    assert len(s) == 2 * 2 * 3
    assert not s.duplicated(["depth", "width", "init"]).any()
    assert list(s.init[:3]) == ["pretrained", "he", "tutorial"]  # pretrained first
    row = s[(s.depth == 2) & (s.width == 16) & (s.init == "tutorial")].iloc[0]
    assert row.n == 6 and row.n_failed == 0 and row.n_pairs == 6
    assert row["mean"] == pytest.approx(0.10 + 0.02 + 0.02 + 0.0025)
    assert row.diff_mean == pytest.approx(-0.02)
    assert row.diff_ci_low == pytest.approx(-0.02) and row.diff_ci_high == pytest.approx(-0.02)
    assert row.p_wilcoxon == pytest.approx(2 / 64)  # 6 differences, all of one sign
    he = s[(s.depth == 1) & (s.width == 8) & (s.init == "he")].iloc[0]
    assert he.diff_mean == pytest.approx(-0.05)
    pre = s[(s.depth == 1) & (s.width == 8) & (s.init == "pretrained")].iloc[0]
    assert pd.isna(pre.n_pairs) and math.isnan(pre.diff_mean)
    assert pre.p_welch != pre.p_welch  # nan: the pretrained row has nothing to compare


def test_summary_excludes_failed_cells_and_counts_them():
    table = _table()
    sel = (table.depth == 1) & (table.width == 8) & (table.seed == 0)
    table.loc[sel & (table.init == "tutorial"), ["status", "test_error"]] = ["failed", np.nan]
    table.loc[sel & (table.init == "pretrained"), "status"] = "diverged"
    s = summarize(table, ["depth", "width"], resamples=500)
    tut = s[(s.depth == 1) & (s.width == 8) & (s.init == "tutorial")].iloc[0]
    pre = s[(s.depth == 1) & (s.width == 8) & (s.init == "pretrained")].iloc[0]
    assert (tut.n, tut.n_failed, pre.n, pre.n_failed) == (5, 1, 5, 1)
    assert tut.n_pairs == 5  # seed 0 has no finished pair
    he = s[(s.depth == 1) & (s.width == 8) & (s.init == "he")].iloc[0]
    assert he.n == 6 and he.n_pairs == 5
    ok = table[table.status == "ok"]
    a = ok[(ok.depth == 1) & (ok.width == 8) & (ok.init == "pretrained")].test_error
    b = ok[(ok.depth == 1) & (ok.width == 8) & (ok.init == "he")].test_error
    assert he.p_welch == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)


def test_summary_without_grouping_factors():
    table = _table()
    table = table[(table.depth == 1) & (table.width == 8)]
    s = summarize(table, [], resamples=500)
    assert list(s.init) == ["pretrained", "he", "tutorial"] and list(s.n) == [6, 6, 6]

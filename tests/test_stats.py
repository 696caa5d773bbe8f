"""Statistics of the ablation summary, on synthetic tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from reports.stats import (bootstrap_ci, brown_forsythe, describe, paired_differences, summarize,
                           welch_t, wilcoxon_p)


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


def _p_f_1_4(f: float) -> float:
    """P(F(1, 4) > f) in closed form: F(1, ν) = t², and Student's t with ν = 4 has
    P(|T| > t) = 1 − t (t² + 6) / (t² + 4)^(3/2)."""
    t = math.sqrt(f)
    return 1 - t * (t * t + 6) / (t * t + 4) ** 1.5


def test_brown_forsythe_against_a_hand_computation():
    # a = [1, 2, 3]: median 2, |deviations| z = [1, 0, 1], mean 2/3
    # b = [0, 3, 6]: median 3, z = [3, 0, 3], mean 2; grand mean of the z's 4/3
    # between = 3 (2/3 − 4/3)² + 3 (2 − 4/3)² = 8/3 over k − 1 = 1
    # within = (1/9 + 4/9 + 1/9) + (1 + 4 + 1) = 20/3 over N − k = 4, i.e. 5/3
    # F = (8/3) / (5/3) = 1.6 on (1, 4) degrees of freedom
    f, p = brown_forsythe([1.0, 2.0, 3.0], [0.0, 3.0, 6.0])
    assert f == pytest.approx(1.6)
    assert p == pytest.approx(_p_f_1_4(1.6)) and p == pytest.approx(0.2745766, abs=1e-6)
    # b = [0, 5, 10]: z = [5, 0, 5], mean 10/3; grand mean 2; between = 32/3;
    # within = (2/3 + 50/3) / 4 = 13/3; F = 32/13
    f, p = brown_forsythe([0.0, 1.0, 2.0], [0.0, 5.0, 10.0])
    assert f == pytest.approx(32 / 13) and p == pytest.approx(_p_f_1_4(32 / 13))
    assert p < 0.2745766  # a larger spread ratio, a smaller p


def test_brown_forsythe_matches_scipy_and_ignores_location_and_order():
    rng = np.random.default_rng(3)
    narrow, wide = rng.normal(0.06, 0.001, 100), rng.normal(0.07, 0.003, 100)
    f, p = brown_forsythe(narrow, wide)
    ref = sps.levene(narrow, wide, center="median")
    assert (f, p) == pytest.approx((ref.statistic, ref.pvalue))
    assert p < 1e-6  # 100 seeds each, a threefold spread: clearly different
    assert brown_forsythe(wide, narrow) == pytest.approx((f, p))
    assert brown_forsythe(narrow + 5.0, wide - 1.0) == pytest.approx((f, p))
    same = brown_forsythe(rng.normal(0, 1, 100), rng.normal(3, 1, 100))[1]
    assert same > 0.01  # equal spreads, different means: no evidence against equal spread
    assert all(math.isnan(v) for v in brown_forsythe([1.0], [1.0, 2.0, 3.0]))
    assert all(math.isnan(v) for v in brown_forsythe([1.0, 1.0], [2.0, 2.0]))  # no variation


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
    pre_e = table[(table.depth == 2) & (table.width == 16) & (table.init == "pretrained")]
    tut_e = table[(table.depth == 2) & (table.width == 16) & (table.init == "tutorial")]
    assert (row.bf_stat, row.p_brown_forsythe) == pytest.approx(
        brown_forsythe(pre_e.test_error, tut_e.test_error), nan_ok=True)
    he = s[(s.depth == 1) & (s.width == 8) & (s.init == "he")].iloc[0]
    assert he.diff_mean == pytest.approx(-0.05)
    pre = s[(s.depth == 1) & (s.width == 8) & (s.init == "pretrained")].iloc[0]
    assert pd.isna(pre.n_pairs) and math.isnan(pre.diff_mean)
    assert pre.p_welch != pre.p_welch  # nan: the pretrained row has nothing to compare
    assert math.isnan(pre.bf_stat) and math.isnan(pre.p_brown_forsythe)


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

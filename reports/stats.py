"""Statistics of the ablation: plain functions on numpy arrays and pandas tables.

Everything an ablation summary reports per group of factors (Erhan et al. 2010, §6):
the spread of test error over seeds, a percentile-bootstrap confidence interval of its
mean, the pretrained-minus-random difference over shared seeds with its bootstrap
interval, a Wilcoxon signed-rank p-value (paired) and Welch's t-test p-value (unpaired),
and the Brown–Forsythe test of equal spreads (the paper's second claim: pretraining also
narrows the spread of test error across seeds).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

PRETRAINED = "pretrained"
#: Columns of :func:`summarize`'s table after the group columns.
SUMMARY_COLUMNS = ("init", "n", "n_failed", "mean", "std", "median", "ci_low", "ci_high",
                   "n_pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "p_wilcoxon",
                   "p_welch", "bf_stat", "p_brown_forsythe")


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean.

    Resamples the n values with replacement ``resamples`` times (one vectorised draw,
    (resamples, n) indices), takes each resample's mean and returns the (1-level)/2 and
    (1+level)/2 quantiles of those means (Efron & Tibshirani 1993, §13.3).

    Args:
        values: (n,) observations; n = 0 gives (nan, nan), n = 1 gives (x, x).
        resamples: Number of bootstrap resamples B.
        level: Confidence level, e.g. 0.95.
        seed: Seed of the resampling (numpy ``default_rng``), so intervals are reproducible.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``scipy.stats.wilcoxon``,
    zero differences dropped, exact distribution for small samples without ties). nan for no
    pairs; 1.0 when every difference is zero."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return float("nan")
    if not np.any(d):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(wilcoxon(d).pvalue)


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of mean(a) = mean(b) (``scipy.stats.ttest_ind``,
    ``equal_var=False``): t = (ā - b̄) / sqrt(s_a²/n_a + s_b²/n_b) with Welch–Satterthwaite
    degrees of freedom. Returns (t, df, two-sided p); nan where undefined (n < 2, zero
    variance in both samples)."""
    from scipy.stats import ttest_ind

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return float("nan"), float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.df), float(res.pvalue)


def brown_forsythe(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Brown–Forsythe test of equal spread (Levene's test with group medians) of two samples.

    With z_ij = |x_ij − median_i| the absolute deviations of group i from its median, it is
    the one-way ANOVA F of the z's (Brown & Forsythe 1974), k = 2 groups, N = n_a + n_b::

        F = (N − k) Σ_i n_i (z̄_i − z̄)² / ((k − 1) Σ_i Σ_j (z_ij − z̄_i)²)

    and p = P(F(k − 1, N − k) > F), the F distribution's survival function
    (``scipy.stats.f.sf``, the regularised incomplete beta). The same as
    ``scipy.stats.levene(a, b, center="median")``.

    Args:
        a: (n_a,) one arm's test errors over seeds.
        b: (n_b,) the other arm's.

    Returns:
        (F, p); nan when a sample has fewer than 2 values or every deviation equals its
        group's mean deviation (no within-group variation of the z's).
    """
    from scipy.stats import f as f_dist

    groups = [np.asarray(x, dtype=float) for x in (a, b)]
    if any(g.size < 2 for g in groups):
        return float("nan"), float("nan")
    z = [np.abs(g - np.median(g)) for g in groups]  # absolute deviations from the medians
    n_total, k = sum(g.size for g in z), len(z)
    grand = np.concatenate(z).mean()
    between = sum(g.size * (g.mean() - grand) ** 2 for g in z) / (k - 1)
    within = sum(((g - g.mean()) ** 2).sum() for g in z) / (n_total - k)
    if within == 0:
        return float("nan"), float("nan")
    stat = float(between / within)
    return stat, float(f_dist.sf(stat, k - 1, n_total - k))


def paired_t(differences: Sequence[float]) -> tuple[float, float]:
    """Paired t-test of mean difference 0 (``scipy.stats.ttest_1samp`` on the differences,
    the same as ``ttest_rel``): t = d̄ / (s_d / sqrt(n)), n − 1 degrees of freedom. Returns
    (t, two-sided p); nan for n < 2 or differences all equal."""
    from scipy.stats import ttest_1samp

    d = np.asarray(differences, dtype=float)
    if d.size < 2 or np.all(d == d[0]):
        return float("nan"), float("nan")
    res = ttest_1samp(d, 0.0)
    return float(res.statistic), float(res.pvalue)


def paired_differences(first: pd.Series, second: pd.Series) -> pd.Series:
    """``first - second`` on the index values (seeds) both have, sorted by seed."""
    shared = first.index.intersection(second.index).sort_values()
    return first.loc[shared] - second.loc[shared]


def describe(values: Sequence[float], resamples: int = 10_000, level: float = 0.95,
             seed: int = 0) -> dict[str, float]:
    """n, mean, sample std (ddof 1), median and the bootstrap CI of the mean."""
    x = np.asarray(values, dtype=float)
    lo, hi = bootstrap_ci(x, resamples, level, seed)
    return {
        "n": int(x.size),
        "mean": float(x.mean()) if x.size else float("nan"),
        "std": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
        "median": float(np.median(x)) if x.size else float("nan"),
        "ci_low": lo, "ci_high": hi,
    }


def summarize(table: pd.DataFrame, by: Sequence[str], value: str = "test_error",
              resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per group of ``by`` and init: the statistics of ``value`` over seeds.

    Only rows with ``status == "ok"`` enter the statistics; ``n_failed`` counts the others.
    Each random-init row also carries the paired difference *pretrained − this scheme* over
    the seeds where both finished (``n_pairs``, ``diff_mean``, its bootstrap CI,
    ``p_wilcoxon``), Welch's p-value over all finished seeds of both (``p_welch``) and the
    Brown–Forsythe test of equal spread of the two (``bf_stat``, ``p_brown_forsythe``).

    Args:
        table: One row per cell with columns ``by``, ``init``, ``seed``, ``status``, ``value``.
        by: The factors that define a group (every factor but seed and init).
    """
    by = list(by)
    rows: list[dict[str, Any]] = []
    groups = table.groupby(by, dropna=False, sort=True) if by else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        ok = group[group["status"] == "ok"]
        per_init = {init: g.set_index("seed")[value].astype(float)
                    for init, g in ok.groupby("init", sort=False)}
        pre = per_init.get(PRETRAINED)
        for init in _init_order(group["init"].unique()):
            errors = per_init.get(init, pd.Series(dtype=float))
            row = dict(zip(by, key)) | {"init": init} | describe(errors, resamples, level, seed)
            row["n_failed"] = int(((group["init"] == init) & (group["status"] != "ok")).sum())
            if init != PRETRAINED and pre is not None:
                d = paired_differences(pre, errors)
                lo, hi = bootstrap_ci(d, resamples, level, seed)
                row |= {"n_pairs": int(d.size),
                        "diff_mean": float(d.mean()) if d.size else float("nan"),
                        "diff_ci_low": lo, "diff_ci_high": hi,
                        "p_wilcoxon": wilcoxon_p(d), "p_welch": welch_t(pre, errors)[2]}
                row["bf_stat"], row["p_brown_forsythe"] = brown_forsythe(pre, errors)
            rows.append(row)
    out = pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])
    return out.astype({"n": int, "n_failed": int, "n_pairs": "Int64"})


def _init_order(inits: Sequence[str]) -> list[str]:
    """``pretrained`` first, then the random schemes in alphabetical order."""
    return sorted(inits, key=lambda s: (s != PRETRAINED, s))

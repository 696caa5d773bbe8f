"""Choosing a factor on validation (Vincent et al. 2010's ν): the choice follows the mean
validation error of the pretrained arm, never the test error, and the report gives both
arms' test errors at the chosen value."""

from __future__ import annotations

import pandas as pd
import pytest

from config.grid_spec import Grid
from reports.selection import format_validation, select_on_validation, validation_means

LEVELS = (0.1, 0.25, 0.4)
# mean validation error of the pretrained arm per (variant, ν); the test errors are built
# to favour ν = 0.1 everywhere, so a choice made on test would differ
VAL = {("bg-rand", 0.1): 0.140, ("bg-rand", 0.25): 0.120, ("bg-rand", 0.4): 0.110,
       ("rot", 0.1): 0.100, ("rot", 0.25): 0.090, ("rot", 0.4): 0.095}


def _table() -> pd.DataFrame:
    rows = []
    for (variant, nu), val in VAL.items():
        for seed in range(3):
            jitter = (seed - 1) / 1000  # mean over seeds = val
            test = 0.05 + (nu - 0.1) + jitter  # lowest at ν = 0.1
            rows.append({"variant": variant, "corruption_level": nu, "init": "pretrained",
                         "seed": seed, "status": "ok", "val_error": val + jitter,
                         "test_error": test})
            # the random twin does not depend on ν: the same errors at every level
            rows.append({"variant": variant, "corruption_level": nu, "init": "tutorial",
                         "seed": seed, "status": "ok", "val_error": 0.2 + jitter,
                         "test_error": 0.21 + 2 * jitter})
    return pd.DataFrame(rows)


BY = ["variant", "corruption_level"]


def test_the_choice_is_the_lowest_mean_validation_error_of_the_pretrained_arm():
    means = validation_means(_table(), BY, "corruption_level")
    assert len(means) == 6 and list(means.n) == [3] * 6
    chosen = means[means.chosen].set_index("variant")["corruption_level"].to_dict()
    assert chosen == {"bg-rand": 0.4, "rot": 0.25}
    row = means[(means.variant == "rot") & (means.corruption_level == 0.4)].iloc[0]
    assert row.val_mean == pytest.approx(0.095) and not row.chosen


def test_both_arms_are_scored_on_test_at_the_chosen_value():
    summary, _ = select_on_validation(_table(), BY, "corruption_level", resamples=200)
    assert len(summary) == 4  # 2 variants x 2 arms
    got = summary.set_index(["variant", "init"])
    pre = got.loc[("bg-rand", "pretrained")]
    assert pre.corruption_level == 0.4 and pre.n == 3
    assert pre["mean"] == pytest.approx(0.05 + 0.3)  # ν = 0.4's test error, not ν = 0.1's
    rnd = got.loc[("rot", "tutorial")]
    assert rnd.corruption_level == 0.25 and rnd["mean"] == pytest.approx(0.21)
    assert rnd.n_pairs == 3 and rnd.diff_mean == pytest.approx(0.05 + 0.15 - 0.21)
    # spreads: |deviations| from the medians (1, 0, 1) and (2, 0, 2) per mille; between
    # 3 (1/3)² 2 = 2/3, within (2/3 + 8/3) / 4 = 5/6 (per mille squared): F = 0.8
    assert rnd.bf_stat == pytest.approx(0.8)


def test_failed_cells_do_not_vote_and_ties_go_to_the_smallest_value():
    table = _table()
    # ν = 0.4 on bg-rand loses seed 0: its mean is over the two finished seeds
    bad = (table.variant == "bg-rand") & (table.corruption_level == 0.4) & (table.seed == 0) \
        & (table.init == "pretrained")
    table.loc[bad, ["status", "val_error"]] = ["failed", None]
    means = validation_means(table, BY, "corruption_level")
    row = means[(means.variant == "bg-rand") & (means.corruption_level == 0.4)].iloc[0]
    assert row.n == 2 and row.val_mean == pytest.approx(0.1105)
    assert means[means.chosen & (means.variant == "bg-rand")].corruption_level.item() == 0.4
    tied = _table()
    tied.loc[tied.init == "pretrained", "val_error"] = 0.1
    means = validation_means(tied, BY, "corruption_level")
    assert list(means[means.chosen].corruption_level) == [0.1, 0.1]
    assert "*" in format_validation(means, "corruption_level")


def test_a_grid_may_only_select_one_of_its_factors():
    factors = {"corruption_level": [0.1, 0.4], "init": ["pretrained", "tutorial"]}
    grid = Grid.model_validate({"name": "g", "factors": factors,
                                "select_on_validation": "corruption_level"})
    assert grid.select_on_validation == "corruption_level"
    for bad in ("depth", "seed", "init"):
        with pytest.raises(ValueError, match="not a factor of this grid"):
            Grid.model_validate({"name": "g", "factors": factors, "select_on_validation": bad})

"""The grids of the papers' protocols: Vincent et al. 2010's Table 3 (``vincent``,
``vincent-tiny``) cell by cell, and its tiny variant end to end with ν chosen on
validation."""

from __future__ import annotations

import collections

import pandas as pd
import pytest

from config.grid import GRIDS_DIR, customise, expand, load_grid
from tasks.finetune import finetune_cache_key
from tasks.pretrain import pretrain_cache_key

LEVELS = [0.1, 0.25, 0.4]


def test_vincent_grid_is_the_papers_protocol(tmp_path):
    grid = customise(load_grid(GRIDS_DIR / "vincent.yaml"), data_dir=tmp_path)
    assert grid.select_on_validation == "corruption_level"
    cells = expand(grid)
    assert len(cells) == 2 * 3 * 2 * 3
    for c in cells:
        cfg = c.config
        assert cfg.data.dataset == {"bg-rand": "mnist-bg-rand", "rot": "mnist-rot"}[
            c.factors["variant"]]
        assert (cfg.data.n_train, cfg.data.n_valid) == (10_000, 2_000)  # the paper's 10k / 2k
        assert cfg.model.hidden_sizes == [1000] * 3 and cfg.model.activation == "sigmoid"
        assert cfg.pretrain.noise == "masking"
        assert cfg.pretrain.corruption_levels == [c.factors["corruption_level"]] * 3
        assert cfg.runtime.precision == "32-true"
    assert sorted({c.factors["corruption_level"] for c in cells}) == LEVELS
    assert {c.factors["init"] for c in cells} == {"pretrained", "tutorial"}


@pytest.mark.parametrize("name", ["vincent", "vincent-tiny"])
def test_the_random_twin_is_one_run_per_dataset_and_seed(name, tmp_path):
    """ν is a pretraining setting: the random cells at the three levels share one fine-tuning
    cache key (so one worker trains each once), the pretrained ones differ in every layer."""
    cells = expand(customise(load_grid(GRIDS_DIR / f"{name}.yaml"), data_dir=tmp_path))
    keys = collections.defaultdict(set)
    for c in cells:
        digest = c.config.data.digest()
        group = (c.factors["variant"], c.factors["seed"], c.arm)
        if c.arm == "random":
            keys[group].add(finetune_cache_key("random", c.config, digest, None))
        else:
            keys[group].add(pretrain_cache_key(0, c.config, digest, []))
    seeds = len(load_grid(GRIDS_DIR / f"{name}.yaml").factors.seeds)
    assert len(keys) == 2 * seeds * 2
    for (_, _, arm), found in keys.items():
        assert len(found) == (1 if arm == "random" else 3)


def test_each_random_twin_is_submitted_once():
    from tasks.ablation_plan import distinct_runs

    cells = expand(load_grid(GRIDS_DIR / "vincent-tiny.yaml"))
    alias = distinct_runs(cells)
    runs = {c.id for c in cells if alias[c.id] == c.id}
    assert len(runs) == 12 + 4  # every pretrained cell; one random run per dataset and seed
    for c in cells:
        rep = next(r for r in cells if r.id == alias[c.id])
        assert (rep.arm, rep.factors["variant"], rep.factors["seed"]) == (
            c.arm, c.factors["variant"], c.factors["seed"])
        if c.arm == "random":
            assert rep.factors["corruption_level"] == 0.1  # the first level in grid order
    tiny = expand(load_grid(GRIDS_DIR / "tiny.yaml"))  # depth changes the random network
    assert all(k == v for k, v in distinct_runs(tiny).items())


@pytest.mark.slow  # about 2 minutes on 2 busy cores: 24 cells, 36 tiny layer trainings
def test_vincent_tiny_chooses_nu_on_validation_and_scores_both_arms(
        shared_data_dir, prefect_harness, tmp_path, monkeypatch):
    from flows.ablation import run_ablation

    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path / "home"))
    grid = customise(load_grid(GRIDS_DIR / "vincent-tiny.yaml"), data_dir=shared_data_dir)
    result = run_ablation(grid, out_dir=tmp_path / "out", population=2,
                          tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", verbose=False)
    assert result.n_ok == result.n_cells == 24
    table = pd.read_parquet(result.files["table_parquet"])
    means = pd.read_csv(result.files["validation_csv"])
    chosen = pd.read_csv(result.files["selection_csv"])
    pre = table[table.init == "pretrained"]
    for variant, rows in means.groupby("variant"):
        expected = pre[pre.variant == variant].groupby("corruption_level").val_error.mean()
        assert rows.set_index("corruption_level").val_mean.to_dict() == pytest.approx(
            expected.to_dict())
        nu = rows[rows.chosen].corruption_level.item()
        assert nu == expected.idxmin()  # the lowest mean validation error, not test error
        for init in ("pretrained", "tutorial"):
            row = chosen[(chosen.variant == variant) & (chosen.init == init)].iloc[0]
            cells = table[(table.variant == variant) & (table.init == init)
                          & (table.corruption_level == nu)]
            assert row.corruption_level == nu and row["mean"] == pytest.approx(
                cells.test_error.mean())
    # the random twin trained once per dataset and seed: the same errors at every level
    rnd = table[table.init == "tutorial"].groupby(["variant", "seed"]).test_error.nunique()
    assert (rnd == 1).all()
    assert "chosen on validation" in result.summary_text and "p BF" in result.summary_text

"""The ablation's grid and plan, before anything trains: grid files and their validation,
the cells a grid expands to, the layers they share, the populations of seeds, the task
runner, the figures' coverage and how a failed cell's cause is told."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from config.grid import GRIDS_DIR, customise, expand, grid_presets, load_grid
from config.grid_spec import Variant
from runtime.errors import ConfigError


def _cli() -> typer.Typer:
    from cli.ablate import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, so that the command is called by name
        """layerwise"""

    register(app)
    return app


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


# --- the grid spec -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist", "mnist-bg-rand", "mnist-rot"])
def test_a_named_dataset_stays_a_name_in_every_cell(name, tmp_path):
    cells = expand(customise(load_grid(GRIDS_DIR / "tiny.yaml"), dataset=name, data_dir=tmp_path))
    assert {c.config.data.dataset for c in cells} == {name}


def test_shipped_grids_load_and_expand(tmp_path):
    assert {"tiny", "erhan-small", "erhan", "reversal"} <= set(grid_presets())
    sizes = {}
    for name in ("tiny", "erhan-small", "reversal"):
        grid = customise(load_grid(GRIDS_DIR / f"{name}.yaml"), data_dir=tmp_path)
        cells = expand(grid)
        sizes[name] = len(cells)
        assert all(c.config.data.data_dir == tmp_path.resolve() for c in cells)
    assert sizes["tiny"] == 12 and sizes["erhan-small"] == 3 * 2 * 10
    reversal = expand(load_grid(GRIDS_DIR / "reversal.yaml"))
    kinds = {(c.factors["variant"], c.config.model.activation, c.config.model.init,
              c.config.pretrain.loss, c.arm) for c in reversal}
    assert {("sigmoid-tutorial", "sigmoid", "tutorial", "cross_entropy", a)
            for a in ("pretrained", "random")} | {("relu-he", "relu", "he", "squared_error", a)
                                                  for a in ("pretrained", "random")} == kinds
    erhan = load_grid(GRIDS_DIR / "erhan.yaml")
    assert erhan.factors.depth == [1, 2, 3, 4, 5] and len(erhan.factors.seeds) >= 50


def test_tiny_cells_pair_the_arms_of_each_seed():
    cells = expand(load_grid(GRIDS_DIR / "tiny.yaml"))
    by = collections.defaultdict(list)
    for c in cells:
        by[(c.factors["depth"], c.factors["seed"])].append(c)
    assert len(by) == 6
    for (depth, seed), pair in by.items():
        pre, rnd = sorted(pair, key=lambda c: c.arm)
        assert (pre.arm, rnd.arm, rnd.factors["init"]) == ("pretrained", "random", "tutorial")
        assert pre.config == rnd.config  # only the arm differs: same data, order, budget
        assert pre.config.model.hidden_sizes == [32] * depth
        assert pre.config.runtime.seed == seed and pre.config.data.n_train == 2000


def test_seeds_override_and_variants_expand(tmp_path):
    grid = customise(load_grid(GRIDS_DIR / "tiny.yaml"), seeds=5)
    assert grid.factors.seeds == [0, 1, 2, 3, 4] and len(expand(grid)) == 20
    path = _write(tmp_path, """
name: v
base: {preset: quick, overrides: {pretrain: {loss: squared_error}}}
factors:
  variant:
    - {name: lr-small, overrides: {finetune: {optimizer: {lr: 0.01}}}}
    - {name: lr-big, overrides: {finetune: {optimizer: {lr: 0.2}}}}
  activation: [relu, sigmoid]
  corruption_level: [0.0, 0.4]
  init: [pretrained, random, he]
  seeds: [3]
""")
    cells = expand(load_grid(path))
    assert len(cells) == 2 * 2 * 2 * 3
    relu = [c for c in cells if c.factors["activation"] == "relu" and c.arm == "random"]
    assert {c.factors["init"] for c in relu} == {"tutorial", "he"}  # 'random' = model.init
    assert all(c.config.pretrain.corruption_levels == [c.factors["corruption_level"]] * 2
               for c in cells)


@pytest.mark.parametrize("text, match", [
    ("factors: {depth: [1], colour: [red]}", r"factors.colour.*Extra inputs"),
    ("factors: {depth: []}", r"factors.depth.*at least 1 item"),
    ("factors: {depth: [0]}", r"factors.depth.*at least 1"),
    ("factors: {init: [pretrained, lecun]}", r"factors.init.0?.*"),
    ("factors: {seeds: [1, 1]}", r"repeated value"),
    ("base: {preset: nope}\nfactors: {depth: [1]}", r"unknown pipeline preset"),
    ("factors: {depth: [1]}\nretries: -1", r"retries"),
])
def test_invalid_grids_are_rejected(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_grid(_write(tmp_path, "name: bad\n" + text))


def test_an_invalid_cell_is_named_before_any_work(tmp_path):
    grid = load_grid(_write(tmp_path, """
name: bad
base: {preset: quick}
factors: {depth: [1, 2], activation: [relu], init: [pretrained], seeds: [0, 1]}
"""))
    with pytest.raises(ConfigError) as err:
        expand(grid)
    msg = str(err.value)
    assert "2 of 4 cells" in msg
    assert "cell depth=2,activation=relu,init=pretrained,seed=0 (and 1 more cells)" in msg
    assert "cross_entropy" in msg and "depth=1" not in msg


def test_duplicate_cells_are_rejected(tmp_path):
    grid = load_grid(_write(tmp_path, "name: dup\nfactors: {init: [random, tutorial]}\n"))
    with pytest.raises(ConfigError, match="same run"):
        expand(grid)


def test_cli_rejects_a_bad_grid_with_exit_2(tmp_path):
    runner = CliRunner()
    bad = _write(tmp_path, "name: bad\nfactors: {depth: [1], width: []}\n")
    result = runner.invoke(_cli(), ["ablate", "--grid", str(bad)])
    assert result.exit_code == 2 and "factors.width" in result.output
    result = runner.invoke(_cli(), ["ablate", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown ablation preset" in result.output
    result = runner.invoke(_cli(), ["ablate", "--preset", "tiny", "--grid", str(bad)])
    assert result.exit_code == 2
    result = runner.invoke(_cli(), ["ablate", "--preset", "tiny", "--population", "0"])
    assert result.exit_code == 2 and "--population" in result.output


def test_figures_cover_depth_and_n_train(tmp_path):
    from PIL import Image

    from reports.ablation_figures import draw_all
    from reports.stats import summarize

    rng = np.random.default_rng(0)
    rows = [{"variant": v, "depth": d, "n_train": n, "init": i, "seed": s, "status": "ok",
             "test_error": 0.02 + 0.01 * d + 100 / n + (i != "pretrained") * 0.01
             + rng.normal(0, 0.002)}
            for v in ("sigmoid", "relu") for d in (1, 2, 3) for n in (1000, 10000)
            for i in ("pretrained", "tutorial", "he") for s in range(4)]
    table = pd.DataFrame(rows)
    by = ["variant", "depth", "n_train"]
    summary = summarize(table, by, resamples=200)
    files = draw_all(table, summary, by, tmp_path)
    assert set(files) == {"histograms", "error_vs_depth", "error_vs_n_train"}
    for path in files.values():
        with Image.open(path) as img:
            img.load()
            assert img.size[0] > 300 and img.size[1] > 200
    from reports.ablation_figures import spread_note
    from reports.stats import brown_forsythe

    panel = table[(table.variant == "relu") & (table.depth == 2) & (table.n_train == 1000)]
    p_tut = brown_forsythe(panel[panel.init == "pretrained"].test_error,
                           panel[panel.init == "tutorial"].test_error)[1]
    note = spread_note(panel)
    assert note.startswith("spread: BF p=") and f"BF p={p_tut:.2g} (tutorial)" in note
    assert "(he)" in note and spread_note(panel[panel.init != "pretrained"]) == ""
    assert spread_note(panel[panel.seed == 0]) == ""  # one seed per arm: no spread to test
    # Without an n_train factor there is no n_train figure.
    one = table[table.n_train == 1000]
    files = draw_all(one, summarize(one, ["depth"], resamples=200), ["depth"], tmp_path / "b")
    assert set(files) == {"histograms", "error_vs_depth"}


# --- shared pretraining --------------------------------------------------------------------


def test_pretraining_plan_shares_lower_layers_and_stacks():
    from tasks.ablation_plan import pretraining_plan

    cells = expand(load_grid(GRIDS_DIR / "tiny.yaml"))
    nodes, stacks = pretraining_plan(cells)
    assert len(nodes) == 6  # layer 1 and layer 2, per seed
    assert [n.k for n in nodes.values()].count(0) == 3
    for seed in range(3):
        one = stacks[f"depth=1,init=pretrained,seed={seed}"]
        two = stacks[f"depth=2,init=pretrained,seed={seed}"]
        assert len(one) == 1 and two[0] == one[0]
        assert nodes[two[1]].lower == (one[0],)
    assert not any("tutorial" in cell_id for cell_id in stacks)  # random arms: no pretraining
    # Cells differing only in fine-tuning settings share the whole stack.
    grid = load_grid(GRIDS_DIR / "tiny.yaml")
    varied = grid.model_copy(update={"factors": grid.factors.model_copy(update={
        "variant": [Variant(name=n, overrides={
            "finetune": {"max_epochs": e}, "model": {"dropout": d}})
            for n, e, d in (("a", 1, 0.0), ("b", 3, 0.5))]})})
    nodes2, stacks2 = pretraining_plan(expand(varied))
    assert len(nodes2) == 6 and len(stacks2) == 12


def test_task_runner_choice():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.ablation import task_runner

    one = task_runner(1)
    assert isinstance(one, ThreadPoolTaskRunner) and one._max_workers == 1  # sequential
    pool = task_runner(3)
    assert isinstance(pool, ProcessPoolTaskRunner) and pool._max_workers == 3
    dask = task_runner(4, dask_address="tcp://127.0.0.1:8786")
    assert isinstance(dask, DaskTaskRunner) and dask.address == "tcp://127.0.0.1:8786"


def test_population_plan_groups_the_seeds_of_each_layer_and_cell():
    from tasks.ablation_plan import pretraining_plan
    from tasks.ablation_plan import population_plan

    cells = expand(load_grid(GRIDS_DIR / "tiny.yaml"))
    nodes, stacks = pretraining_plan(cells)
    pops, groups = population_plan(cells, nodes, stacks, 2)
    # Layer 1 and layer 2 of seeds {0, 1} and {2}: four population layers, lower first.
    assert [(p.k, [c.runtime.seed for c in p.configs]) for p in pops.values()] == [
        (0, [0, 1]), (0, [2]), (1, [0, 1]), (1, [2])]
    by_seed = {}
    for pop in pops.values():
        for i, (key, config) in enumerate(zip(pop.keys, pop.configs)):
            by_seed[(pop.k, config.runtime.seed)] = (pop.id, i)
            assert nodes[key].config.runtime.seed == config.runtime.seed
    for pop in pops.values():  # member p's lower layers are its own seed's layers
        for config, slots in zip(pop.configs, pop.lower):
            assert [(pop.inputs[pos], i) for pos, i in slots] == [
                by_seed[(k, config.runtime.seed)] for k in range(pop.k)]
    # 2 depths x 2 arms, each cut into seeds {0, 1} and {2}; every cell exactly once.
    assert sorted(len(g.cells) for g in groups) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert sorted(c.id for g in groups for c in g.cells) == sorted(c.id for c in cells)
    for group in groups:
        assert len({c.arm for c in group.cells}) == 1
        assert len({(c.factors["depth"], c.factors["init"]) for c in group.cells}) == 1
        for cell, slots in zip(group.cells, group.stacks):
            expected = ([by_seed[(k, cell.config.runtime.seed)]
                         for k in range(cell.config.model.n_layers)]
                        if cell.arm == "pretrained" else [])
            assert [(group.inputs[pos], i) for pos, i in slots] == expected
    one = population_plan(cells, nodes, stacks, 1)[1]
    assert len(one) == 12  # P = 1: one member per group
    with pytest.raises(ValueError, match="at least 1"):
        population_plan(cells, nodes, stacks, 0)


def test_a_failed_cell_reports_the_whole_cause_chain():
    from flows.submission import describe

    try:
        try:
            raise OSError("connection refused")
        except OSError as inner:
            raise RuntimeError("Failed to resolve inputs in parameter 'stack'") from inner
    except RuntimeError as exc:
        text = describe(exc)
    assert text == ("RuntimeError: Failed to resolve inputs in parameter 'stack' <- caused by "
                    "OSError: connection refused")
    assert describe(ValueError("plain")) == "ValueError: plain"


def test_the_tutorial_grid_is_the_tutorial_preset_for_both_arms(tmp_path):
    """``layerwise ablate --preset tutorial`` runs ``layerwise run --preset tutorial``'s
    protocol: each cell's config is the preset's, field by field; only the arm differs."""
    from config.overrides import resolve_config

    cells = expand(customise(load_grid(GRIDS_DIR / "tutorial.yaml"), data_dir=tmp_path))
    preset = resolve_config("tutorial", data_dir=tmp_path, seed=0)
    assert sorted(c.arm for c in cells) == ["pretrained", "random"]
    for cell in cells:
        assert cell.config.model_dump() == preset.model_dump(), cell.id

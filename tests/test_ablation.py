"""The ablation: grid validation, shared pretraining, the tiny grid end to end (with a forced
failure, a divergence, retries and the resume), its MLflow record, and the Dask path."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from config.grid import GRIDS_DIR, customise, expand, grid_presets, load_grid
from config.grid_spec import Variant
from runtime.errors import ConfigError

FAIL = {"depth": 2, "arm": "pretrained", "seed": 1}  # fine-tuning raises in every attempt
DIVERGE = {"depth": 1, "arm": "random", "seed": 2}  # fine-tuning raises DivergenceError
BROKEN_LAYER = (1, 2)  # pretraining layer 2 of seed 2 raises in every attempt
FAIL_ID, DIVERGE_ID = "depth=2,init=pretrained,seed=1", "depth=1,init=tutorial,seed=2"
UPSTREAM_ID = "depth=2,init=pretrained,seed=2"  # its layer 2 failed


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


# --- the tiny grid, end to end -------------------------------------------------------------


def _count_and_break(monkeypatch, counts, broken: bool):
    """Count real pretraining and fine-tuning computations; optionally inject failures."""
    import tasks.finetune
    import tasks.pretrain
    from runtime.errors import DivergenceError

    real_pretrain, real_finetune = tasks.pretrain.pretrain_layer, tasks.finetune.finetune

    def pretrain_layer(k, config, *args, **kwargs):
        counts["pretrain"].append((k, config.runtime.seed))
        if broken and (k, config.runtime.seed) == BROKEN_LAYER:
            raise RuntimeError("injected pretraining failure")
        return real_pretrain(k, config, *args, **kwargs)

    def finetune(arm, config, *args, **kwargs):
        cell = {"depth": config.model.n_layers, "arm": arm, "seed": config.runtime.seed}
        counts["finetune"].append(tuple(cell.values()))
        if broken and cell == FAIL:
            raise RuntimeError("injected failure")
        if broken and cell == DIVERGE:
            raise DivergenceError("injected divergence: loss is nan")
        return real_finetune(arm, config, *args, **kwargs)

    monkeypatch.setattr(tasks.pretrain, "pretrain_layer", pretrain_layer)
    monkeypatch.setattr(tasks.finetune, "finetune", finetune)


@pytest.fixture(scope="module")
def tiny(shared_data_dir, prefect_harness, tmp_path_factory):
    """The tiny grid twice in one store: first with one failing and one diverging cell,
    then the plain rerun (through the CLI), which must resume from the cache."""
    import torch

    from flows.ablation import run_ablation

    root = tmp_path_factory.mktemp("tiny")
    home, uri = root / "home", f"sqlite:///{root}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("LAYERWISE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what Dask workers use; keeps a loaded machine responsive
    grid = customise(load_grid(GRIDS_DIR / "tiny.yaml"), data_dir=shared_data_dir)
    first_counts, second_counts = collections.defaultdict(list), collections.defaultdict(list)
    with pytest.MonkeyPatch.context() as patch:
        _count_and_break(patch, first_counts, broken=True)
        first = run_ablation(grid, out_dir=root / "first", tracking_uri=uri, experiment="tiny",
                             verbose=False)
    stale = _run_of_a_killed_process(uri)  # the rerun marks it KILLED
    with pytest.MonkeyPatch.context() as patch:
        _count_and_break(patch, second_counts, broken=False)
        cli = CliRunner().invoke(_cli(), [
            "ablate", "--grid", str(GRIDS_DIR / "tiny.yaml"), "--data-dir", str(shared_data_dir),
            "--tracking-uri", uri, "--experiment", "tiny", "--out", str(root / "second")])
    torch.set_num_threads(threads)
    yield {"grid": grid, "first": first, "first_counts": first_counts, "cli": cli,
           "second_counts": second_counts, "root": root, "uri": uri, "stale": stale}
    mp.undo()


def _run_of_a_killed_process(uri: str) -> str:
    """A RUNNING cell run whose process is gone, as a kill -9 leaves it."""
    import socket
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny").experiment_id
    return client.create_run(exp, run_name="killed-cell", tags={
        "layerwise.pid": str(proc.pid), "layerwise.host": socket.gethostname(),
        "layerwise.cell": "killed-cell"}).info.run_id


def _table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / "cells.parquet")


def test_first_run_records_the_failed_and_diverged_cells(tiny):
    first = tiny["first"]
    assert first.n_cells == 12 and first.n_ok == 9 and first.n_diverged == 1
    assert sorted(first.failed) == sorted([FAIL_ID, UPSTREAM_ID])
    assert "injected failure" in first.failed[FAIL_ID]
    assert first.failed[UPSTREAM_ID].startswith("pretraining failed")
    assert "injected pretraining failure" in first.failed[UPSTREAM_ID]
    table = _table(first.out_dir)
    status = dict(zip(table.cell, table.status))
    assert status.pop(FAIL_ID) == "failed" and status.pop(UPSTREAM_ID) == "failed"
    assert status.pop(DIVERGE_ID) == "diverged"
    assert set(status.values()) == {"ok"}
    bad = table[table.status != "ok"]
    assert bad.test_error.isna().all() and bad.error.str.len().gt(0).all()
    assert "injected divergence" in bad.set_index("cell").error[DIVERGE_ID]
    summary = pd.read_csv(first.out_dir / "summary.csv")
    row = summary[(summary.depth == 2) & (summary.init == "pretrained")].iloc[0]
    assert (row.n, row.n_failed) == (1, 2)
    rnd = summary[(summary.depth == 2) & (summary.init == "tutorial")].iloc[0]
    assert (rnd.n, rnd.n_pairs) == (3, 1)  # seeds 1 and 2 have no finished pretrained twin
    assert first.summary_text.count("pretrained") == 2


def test_shared_pretraining_is_computed_once(tiny):
    calls = collections.Counter(tiny["first_counts"]["pretrain"])
    # depth 1 and depth 2 share layer 1: one layer-1 and one layer-2 training per seed (the
    # broken layer: its try and its retry).
    assert calls == {(0, 0): 1, (0, 1): 1, (0, 2): 1, (1, 0): 1, (1, 1): 1, BROKEN_LAYER: 2}


def test_failed_cell_is_retried_and_the_divergence_is_not(tiny):
    calls = collections.Counter(tiny["first_counts"]["finetune"])
    assert calls[tuple(FAIL.values())] == 2  # 1 try + retries: 1 (tiny.yaml)
    assert calls[tuple(DIVERGE.values())] == 1  # deterministic: no retry
    assert calls[(2, "pretrained", 2)] == 0  # never started: its pretraining failed
    assert sum(calls.values()) == 9 + 2 + 1


def test_rerun_resumes_from_the_cache(tiny):
    cli, counts = tiny["cli"], tiny["second_counts"]
    assert cli.exit_code == 0, cli.output
    assert counts["pretrain"] == [BROKEN_LAYER]  # every other layer came from the cache
    assert sorted(counts["finetune"]) == sorted([tuple(FAIL.values()), tuple(DIVERGE.values()),
                                                 (2, "pretrained", 2)])
    first, second = _table(tiny["first"].out_dir), _table(tiny["root"] / "second")
    assert (second.status == "ok").all()
    cached = dict(zip(second.cell, second.cached))
    assert sum(cached.values()) == 9
    assert not any(cached[c] for c in (FAIL_ID, DIVERGE_ID, UPSTREAM_ID))
    both = first.merge(second, on="cell", suffixes=("_1", "_2"))
    ok = both[both.status_1 == "ok"]
    assert (ok.test_error_1 == ok.test_error_2).all() and len(ok) == 9
    # The CLI printed the summary table.
    assert "pretrained" in cli.output and "p Wilcoxon" in cli.output
    assert "12 of 12 cells finished" in cli.output


def test_tiny_table_shape_and_values(tiny):
    table = _table(tiny["root"] / "second")
    assert table.shape[0] == 12
    assert {"cell", "depth", "width", "noise", "corruption_level", "n_train", "activation",
            "init", "seed", "status", "test_error", "val_error", "train_loss", "epochs_run",
            "wall_seconds"} <= set(table.columns)
    assert table.test_error.between(0, 1).all() and table.val_error.between(0, 1).all()
    assert (table.test_error < 0.9).all()  # better than chance
    assert table.epochs_run.between(1, 2).all() and (table.train_loss > 0).all()
    assert sorted(table.groupby(["depth", "init"]).size().tolist()) == [3, 3, 3, 3]
    for _, pair in table.groupby(["depth", "seed"]):
        assert len(pair) == 2 and set(pair.init) == {"pretrained", "tutorial"}
        for col in ("n_train", "width", "noise", "corruption_level", "activation",
                    "epochs_run"):
            assert pair[col].nunique() == 1, col
    csv = pd.read_csv(tiny["root"] / "second" / "cells.csv")
    assert np.allclose(csv.test_error, table.test_error)
    summary = pd.read_csv(tiny["root"] / "second" / "summary.csv")
    assert len(summary) == 4 and set(summary.n) == {3}
    for _, row in summary.iterrows():
        errors = table[(table.depth == row.depth) & (table.init == row.init)].test_error
        assert row["mean"] == pytest.approx(errors.mean())
        assert row.ci_low <= row["mean"] <= row.ci_high
        if row.init == "tutorial":
            pre = table[(table.depth == row.depth) & (table.init == "pretrained")]
            d = pre.set_index("seed").test_error - table[
                (table.depth == row.depth) & (table.init == "tutorial")].set_index("seed").test_error
            assert row.diff_mean == pytest.approx(d.mean()) and row.n_pairs == 3
            assert 0 < row.p_wilcoxon <= 1 and 0 <= row.p_welch <= 1
        else:
            assert math.isnan(row.diff_mean)


def test_mlflow_record_of_the_ablation(tiny, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(tiny["uri"])
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`layerwise.kind` = 'ablation'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    first, second = parents
    assert first.info.run_id == tiny["first"].run_id
    params = second.data.params
    assert params["grid.name"] == "tiny" and params["grid.factors.depth"] == "[1, 2]"
    assert params["preset"] == "tiny"  # what `layerwise runs --kind ablation` shows
    assert params["n_cells"] == "12" and params["n_pretrain_layers"] == "6"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{second.info.run_id}'")
    assert len(children) == 12
    for child in children:
        tags, metrics = child.data.tags, child.data.metrics
        assert tags["layerwise.status"] == "ok" and child.info.status == "FINISHED"
        assert tags["layerwise.cell"] == child.info.run_name
        for factor in ("depth", "width", "noise", "corruption_level", "n_train",
                       "activation", "init", "seed"):
            assert factor in tags
        assert 0 <= metrics["test/error"] <= 1 and 0 <= metrics["val/error"] <= 1
    failed = client.search_runs([exp.experiment_id],
                                f"tags.mlflow.parentRunId = '{first.info.run_id}' and "
                                "tags.`layerwise.status` != 'ok'")
    assert sorted((r.data.tags["layerwise.status"], r.info.status) for r in failed) == [
        ("diverged", "FAILED"), ("failed", "FAILED"), ("failed", "FAILED")]
    assert {r.data.tags["layerwise.error"][:11] for r in failed} >= {"pretraining"}
    assert client.search_registered_models() == []  # no model registration per cell
    names = {f.path for f in client.list_artifacts(second.info.run_id, "ablation")}
    assert names == {f"ablation/{n}" for n in ("cells.csv", "cells.parquet", "summary.csv",
                                               "grid.yaml")}
    local = Path(mlflow.artifacts.download_artifacts(run_id=second.info.run_id,
                                                     tracking_uri=tiny["uri"],
                                                     dst_path=str(tmp_path)))
    pngs = sorted(p.name for p in (local / "figures").glob("*.png"))
    assert pngs == ["test_error_histograms.png", "test_error_vs_depth.png"]
    for png in (local / "figures").glob("*.png"):
        with Image.open(png) as img:
            img.load()
            assert img.size[0] > 300 and img.size[1] > 200
    assert len(pd.read_parquet(local / "ablation" / "cells.parquet")) == 12


def test_each_cell_run_holds_every_epoch_once_logged_as_it_ended(tiny):
    """The first run trained its cells: each epoch reached the cell's run when it ended
    (one write per epoch, so the epochs' timestamps differ). The rerun took them from the
    cache: their whole history is logged when they settle. Either way, every epoch once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny["uri"])
    exp = client.get_experiment_by_name("tiny").experiment_id
    parents = client.search_runs([exp], "tags.`layerwise.kind` = 'ablation'",
                                 order_by=["attributes.start_time ASC"])
    tables = [_table(tiny["first"].out_dir), _table(tiny["root"] / "second")]
    assert len(parents) == 2
    for parent, table in zip(parents, tables):
        cached = dict(zip(table.cell, table.cached))
        children = client.search_runs(
            [exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
            "tags.`layerwise.status` = 'ok'")
        assert len(children) == (table.status == "ok").sum() > 0
        for child in children:
            epochs = int(child.data.metrics["finetune/epochs_run"])
            for key in ("finetune/train_loss", "finetune/val_error"):
                history = client.get_metric_history(child.info.run_id, key)
                assert sorted(m.step for m in history) == list(range(epochs)), key
            stamps = {m.timestamp for m in history}
            assert len(stamps) == (1 if cached[child.info.run_name] else epochs)
            assert child.info.status == "FINISHED"
    assert not tables[0].cached.any() and tables[1].cached.sum() == 9


def test_the_rerun_marks_the_runs_of_a_killed_attempt(tiny):
    from mlflow.tracking import MlflowClient

    assert "marked 1 MLflow run(s) of an earlier, killed attempt KILLED" in tiny["cli"].output
    assert MlflowClient(tiny["uri"]).get_run(tiny["stale"]).info.status == "KILLED"


def test_an_interrupted_ablation_leaves_no_run_running(tiny, monkeypatch):
    """Ctrl-C while cells settle: the parent run and every cell run not yet settled end
    KILLED, the settled ones FINISHED."""
    import flows.ablation
    from flows.ablation import run_ablation
    from mlflow.tracking import MlflowClient

    real, shown = flows.ablation.progress_line, []

    def progress_line(i, n, row):
        if i == 3:
            raise KeyboardInterrupt
        shown.append(row["cell"])
        return real(i, n, row)

    monkeypatch.setattr(flows.ablation, "progress_line", progress_line)
    with pytest.raises(BaseException) as stopped:
        run_ablation(tiny["grid"], out_dir=tiny["root"] / "stopped", tracking_uri=tiny["uri"],
                     experiment="tiny-stopped", verbose=False)
    assert isinstance(stopped.value, KeyboardInterrupt)
    client = MlflowClient(tiny["uri"])
    exp = client.get_experiment_by_name("tiny-stopped").experiment_id
    runs = client.search_runs([exp])
    assert len(runs) == 13 and "RUNNING" not in {r.info.status for r in runs}
    parent = next(r for r in runs if r.data.tags.get("layerwise.kind") == "ablation")
    assert parent.info.status == "KILLED"
    status = {r.info.run_name: r.info.status for r in runs if r is not parent}
    settled = {name for name, s in status.items() if s == "FINISHED"}
    assert len(shown) == 2 and len(settled) == 3  # the third had settled when Ctrl-C came
    assert set(shown) < settled and set(status.values()) == {"FINISHED", "KILLED"}


def test_prefect_summary_artifact(tiny):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["layerwise-ablation-summary"])))
    assert arts and all(a.type == "table" for a in arts)


# --- the Dask path -------------------------------------------------------------------------


@pytest.mark.slow  # 30 s: starts a local Dask cluster; the Dask path is optional
def test_dask_cluster_reproduces_the_in_process_results(tiny, shared_data_dir, tmp_path,
                                                         monkeypatch):
    """1 depth × 2 inits × 2 seeds on a LocalCluster of 2 worker processes, in a fresh store,
    through --dask-address: the same test errors as the in-process run."""
    from distributed import LocalCluster

    from flows.ablation import run_ablation

    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path / "home"))
    grid = tiny["grid"]
    grid = grid.model_copy(update={"factors": grid.factors.model_copy(
        update={"depth": [1], "seeds": [0, 1]})})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        result = run_ablation(grid, dask_address=cluster.scheduler_address,
                              out_dir=tmp_path / "out", verbose=False,
                              tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert result.n_ok == 4 and not result.failed
    dask = _table(tmp_path / "out").set_index("cell")
    local = _table(tiny["root"] / "second").set_index("cell")
    assert not dask.cached.any()  # computed on the workers, not read from the other store
    assert (dask.test_error == local.loc[dask.index].test_error).all()
    assert (dask.val_error == local.loc[dask.index].val_error).all()
    # The workers wrote their checkpoints into this store, not the in-process run's.
    assert list((tmp_path / "home" / "stages").glob("pretrain-layer-1-*"))


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


@pytest.mark.slow
def test_process_pool_reproduces_the_in_process_results(tiny, tmp_path, monkeypatch):
    """--workers 2: a local process pool, in a fresh store; the same test errors."""
    from flows.ablation import run_ablation

    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path / "home"))
    grid = tiny["grid"]
    grid = grid.model_copy(update={"factors": grid.factors.model_copy(
        update={"depth": [2], "seeds": [0]})})
    result = run_ablation(grid, workers=2, out_dir=tmp_path / "out", verbose=False,
                          tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert result.n_ok == 2 and not result.failed
    pool = _table(tmp_path / "out").set_index("cell")
    local = _table(tiny["root"] / "second").set_index("cell")
    assert not pool.cached.any()
    assert (pool.test_error == local.loc[pool.index].test_error).all()


# --- populations (--population P) ----------------------------------------------------------


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


@pytest.fixture(scope="module")
def tiny_population(tiny, tmp_path_factory):
    """The tiny grid with --population 3 in a fresh store, counting population calls, with
    the depth-1 random-init population forced to diverge and, inside it, seed 2 diverging
    on its own as in the single-seed run."""
    import torch

    import tasks.finetune
    import tasks.populations
    from runtime.errors import DivergenceError

    root = tmp_path_factory.mktemp("population")
    calls = collections.defaultdict(list)
    real_pre = tasks.populations.pretrain_layer_population
    real_fine = tasks.populations.finetune_population
    real_single = tasks.finetune.finetune

    def pretrain_layer_population(k, configs, *args, **kwargs):
        calls["pretrain"].append((k, tuple(c.runtime.seed for c in configs)))
        return real_pre(k, configs, *args, **kwargs)

    def finetune_population(arm, configs, *args, **kwargs):
        depth = configs[0].model.n_layers
        calls["finetune"].append((depth, arm, tuple(c.runtime.seed for c in configs)))
        if (depth, arm) == (1, "random"):
            raise DivergenceError("injected population divergence: loss is nan")
        return real_fine(arm, configs, *args, **kwargs)

    def finetune(arm, config, *args, **kwargs):
        cell = {"depth": config.model.n_layers, "arm": arm, "seed": config.runtime.seed}
        calls["single"].append(tuple(cell.values()))
        if cell == DIVERGE:
            raise DivergenceError("injected divergence: loss is nan")
        return real_single(arm, config, *args, **kwargs)

    from flows.ablation import run_ablation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAYERWISE_HOME", str(root / "home"))
        patch.setattr(tasks.populations, "pretrain_layer_population", pretrain_layer_population)
        patch.setattr(tasks.populations, "finetune_population", finetune_population)
        patch.setattr(tasks.finetune, "finetune", finetune)
        result = run_ablation(tiny["grid"], population=3, out_dir=root / "out", verbose=False,
                              tracking_uri=f"sqlite:///{root}/mlflow.db", experiment="pop")
    torch.set_num_threads(threads)
    return {"result": result, "calls": calls, "root": root}


def test_population_ablation_trains_each_seed_group_as_one_model(tiny_population):
    calls, result = tiny_population["calls"], tiny_population["result"]
    assert calls["pretrain"] == [(0, (0, 1, 2)), (1, (0, 1, 2))]
    assert sorted(calls["finetune"]) == [(1, "pretrained", (0, 1, 2)), (1, "random", (0, 1, 2)),
                                         (2, "pretrained", (0, 1, 2)), (2, "random", (0, 1, 2))]
    # The diverged population was retried seed by seed: only seed 2 really diverges.
    assert sorted(calls["single"]) == [(1, "random", 0), (1, "random", 1), (1, "random", 2)]
    assert result.n_cells == 12 and result.n_ok == 11 and result.n_diverged == 1
    assert not result.failed
    table = _table(result.out_dir).set_index("cell")
    assert table.loc[DIVERGE_ID].status == "diverged"
    assert "injected divergence" in table.loc[DIVERGE_ID].error


def test_population_members_match_their_single_seed_runs(tiny, tiny_population):
    """Member p is the single run of its seed up to rounding: the same epochs and, at
    worst, a few of the 10,000 test predictions flipped."""
    pop = _table(tiny_population["result"].out_dir).set_index("cell")
    single = _table(tiny["root"] / "second").set_index("cell")
    ok = pop[pop.status == "ok"].index
    assert len(ok) == 11
    assert (pop.loc[ok].epochs_run == single.loc[ok].epochs_run).all()
    assert np.allclose(pop.loc[ok].train_loss, single.loc[ok].train_loss, rtol=1e-4)
    assert (abs(pop.loc[ok].test_error - single.loc[ok].test_error) <= 0.001).all()
    assert (abs(pop.loc[ok].val_error - single.loc[ok].val_error) <= 0.001).all()
    assert not pop.cached.any()


def test_population_ablation_records_a_child_run_per_member(tiny_population):
    from mlflow.tracking import MlflowClient

    result = tiny_population["result"]
    client = MlflowClient(f"sqlite:///{tiny_population['root']}/mlflow.db")
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["population"] == "3"
    children = client.search_runs([result.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(
        _table(result.out_dir).cell)
    statuses = collections.Counter(c.data.tags["layerwise.status"] for c in children)
    assert statuses == {"ok": 11, "diverged": 1}
    # Checkpoints: one per member, in the population stage directories.
    stages = Path(tiny_population["root"]) / "home" / "stages"
    assert len(list(stages.glob("pretrain-layer-1-population-*/member-*/dae.safetensors"))) == 3
    assert len(list(stages.glob("finetune-pretrained-population-*/member-*/*.safetensors"))) == 6


def test_a_failed_cell_reports_the_whole_cause_chain():
    from flows.ablation import describe

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

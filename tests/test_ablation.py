"""The ablation run: the tiny grid end to end (with a forced failure, a divergence, retries
and the resume), its MLflow record (cell runs watched live, interrupted, left by a killed
attempt), the Dask and process-pool paths, and populations of seeds. The grid and the plan
before anything trains: ``tests/test_ablation_plan.py``."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from config.grid import GRIDS_DIR, customise, expand, load_grid
from test_ablation_plan import _cli

FAIL = {"depth": 2, "arm": "pretrained", "seed": 1}  # fine-tuning raises in every attempt
DIVERGE = {"depth": 1, "arm": "random", "seed": 2}  # fine-tuning raises DivergenceError
BROKEN_LAYER = (1, 2)  # pretraining layer 2 of seed 2 raises in every attempt
FAIL_ID, DIVERGE_ID = "depth=2,init=pretrained,seed=1", "depth=1,init=tutorial,seed=2"
UPSTREAM_ID = "depth=2,init=pretrained,seed=2"  # its layer 2 failed


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
    layers = [c for c in children if "layerwise.layer" in c.data.tags]
    children = [c for c in children if "layerwise.cell" in c.data.tags]
    assert len(children) == 12 and len(layers) == 6
    for child in children:
        tags, metrics = child.data.tags, child.data.metrics
        assert tags["layerwise.status"] == "ok" and child.info.status == "FINISHED"
        assert tags["layerwise.cell"] == child.info.run_name
        for factor in ("depth", "width", "noise", "corruption_level", "n_train",
                       "activation", "init", "seed"):
            assert factor in tags
        assert 0 <= metrics["test/error"] <= 1 and 0 <= metrics["val/error"] <= 1
    # `layerwise show`: a cell's or layer's seconds are its training time (its run is open
    # from the ablation's start), and whether it came from the cache
    from tracking.queries import show_run

    stages = show_run(client, second.info.run_id)["stages"].set_index("stage")
    cached = dict(zip(*(_table(tiny["root"] / "second")[c] for c in ("cell", "cached"))))
    for child in children:
        row = stages.loc[child.info.run_name]
        assert row.duration_s == pytest.approx(child.data.metrics["finetune/train_seconds"])
        assert bool(row.cached) == bool(cached[child.info.run_name])
        assert child.data.tags["layerwise.cached"] == str(bool(row.cached)).lower()
    assert sum(bool(v) for v in cached.values()) == 9
    for layer in layers:
        k = layer.data.tags["layerwise.layer"]
        assert stages.loc[layer.info.run_name].duration_s == pytest.approx(
            layer.data.metrics[f"pretrain/layer_{k}/train_seconds"])
    failed = client.search_runs([exp.experiment_id],
                                f"tags.mlflow.parentRunId = '{first.info.run_id}' and "
                                "tags.`layerwise.status` != 'ok'")
    failed = [r for r in failed if "layerwise.cell" in r.data.tags]  # the layer's: below
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
        children = [r for r in client.search_runs(
            [exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
            "tags.`layerwise.status` = 'ok'") if "layerwise.cell" in r.data.tags]
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


def test_each_layer_has_a_run_that_holds_its_epochs(tiny):
    """Every distinct pretraining layer has a child run, open from the start and written
    by the worker as its epochs end (the tiny grid's single epoch: the timestamps are
    checked on cells), a layer from the cache gets its history at the end, and a layer
    that failed ends FAILED with the error."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny["uri"])
    exp = client.get_experiment_by_name("tiny").experiment_id
    parents = client.search_runs([exp], "tags.`layerwise.kind` = 'ablation'",
                                 order_by=["attributes.start_time ASC"])
    epochs = expand(tiny["grid"])[0].config.pretrain.epochs
    for parent, trained in zip(parents, (True, False)):
        layers = [r for r in client.search_runs(
            [exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
            if "layerwise.layer" in r.data.tags]
        assert len(layers) == 6
        by = {(r.data.tags["seed"], r.data.tags["layerwise.layer"]): r for r in layers}
        assert sorted(by) == [(str(s), str(k)) for s in range(3) for k in (1, 2)]
        for (seed, k), run in by.items():
            broken = trained and (int(k) - 1, int(seed)) == BROKEN_LAYER
            assert run.info.status == ("FAILED" if broken else "FINISHED"), (seed, k)
            if broken:
                assert "injected pretraining failure" in run.data.tags["layerwise.error"]
                continue
            assert run.info.run_name.startswith(f"layer-{k}/")
            cached = not trained and (int(k) - 1, int(seed)) != BROKEN_LAYER  # retrained
            assert run.data.tags["layerwise.cached"] == str(cached).lower()
            history = client.get_metric_history(run.info.run_id, f"pretrain/layer_{k}/recon_loss")
            assert sorted(m.step for m in history) == list(range(epochs))


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
    assert len(runs) == 1 + 12 + 6 and "RUNNING" not in {r.info.status for r in runs}
    parent = next(r for r in runs if r.data.tags.get("layerwise.kind") == "ablation")
    assert parent.info.status == "KILLED"
    layers = {r.info.status for r in runs if "layerwise.layer" in r.data.tags}
    assert layers == {"KILLED"}  # they end after the cells
    status = {r.info.run_name: r.info.status for r in runs if "layerwise.cell" in r.data.tags}
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
    runs = client.search_runs([result.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}'")
    children = [r for r in runs if "layerwise.cell" in r.data.tags]
    assert sorted(c.info.run_name for c in children) == sorted(
        _table(result.out_dir).cell)
    statuses = collections.Counter(c.data.tags["layerwise.status"] for c in children)
    assert statuses == {"ok": 11, "diverged": 1}
    for cell in children:  # each member wrote its own epochs to its own run
        if cell.data.tags["layerwise.status"] == "ok":
            history = client.get_metric_history(cell.info.run_id, "finetune/train_loss")
            epochs = int(cell.data.metrics["finetune/epochs_run"])
            assert sorted(m.step for m in history) == list(range(epochs))
    layers = [r for r in runs if "layerwise.layer" in r.data.tags]
    assert len(layers) == 6 and {r.info.status for r in layers} == {"FINISHED"}
    for layer in layers:
        k = layer.data.tags["layerwise.layer"]
        history = client.get_metric_history(layer.info.run_id, f"pretrain/layer_{k}/recon_loss")
        assert [m.step for m in history] == [0]  # the tiny grid's one epoch
    # Checkpoints: one per member, in the population stage directories.
    stages = Path(tiny_population["root"]) / "home" / "stages"
    assert len(list(stages.glob("pretrain-layer-1-population-*/member-*/dae.safetensors"))) == 3
    assert len(list(stages.glob("finetune-pretrained-population-*/member-*/*.safetensors"))) == 6

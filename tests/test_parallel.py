"""Eight concurrent `layerwise run` processes into one embedded SQLite store: every run,
param and metric history must be there (WAL + retry on lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
N = 8
SETS = ["data.n_train=1000", "model.hidden_sizes=[32,16]", "pretrain.epochs=2",
        "finetune.max_epochs=3", "finetune.early_stopping=none"]


@pytest.mark.slow
def test_eight_concurrent_runs_into_sqlite(tmp_path, shared_data_dir):
    env = {**os.environ, "LAYERWISE_HOME": str(tmp_path / "home"), "CI": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = []
    for seed in range(N):
        args = [sys.executable, "-m", "flows.cli", "run", "--preset", "quick", "--seed",
                str(seed), "--data-dir", str(shared_data_dir), "--experiment", "parallel"]
        for item in SETS:
            args += ["--set", item]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    client = MlflowClient(f"sqlite:///{tmp_path}/home/mlflow.db")
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("layerwise.kind") == "pipeline"]
    assert len(parents) == N
    assert sorted(int(r.data.params["runtime.seed"]) for r in parents) == list(range(N))
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(runs) == N * 7  # parent + 6 stages each
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 6
        for child in children:
            if child.data.tags["layerwise.stage"].startswith("finetune-"):
                arm = child.data.tags["layerwise.stage"].split("-", 1)[1]
                hist = client.get_metric_history(child.info.run_id, f"finetune/{arm}/val_error")
                assert [h.step for h in hist] == [0, 1, 2]
        assert {"test/error_pretrained", "test/error_random", "test/error_diff"} <= set(
            parent.data.metrics)
    versions = client.search_model_versions("name = 'layerwise-classifier'")
    assert len(versions) == N

"""Eight concurrent `layerwise run --preset quick` processes with different seeds, counted
run by run, param by param and metric history by metric history:

- into one embedded SQLite store (WAL and retry on lock, ephemeral Prefect);
- into the compose stack's MLflow server backed by PostgreSQL, with its Prefect server
  (``tests/server_stack.py`` starts both natively on loopback).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from server_stack import client_env, postgres, stack  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
N = 8
SETS = ["data.n_train=1000", "model.hidden_sizes=[32,16]", "pretrain.epochs=2",
        "finetune.max_epochs=3", "finetune.early_stopping=none"]


def launch(env: dict[str, str], data_dir: Path, *extra: str) -> list[subprocess.Popen]:
    """N `layerwise run` processes, seeds 0..N-1, started at once."""
    procs = []
    for seed in range(N):
        args = [sys.executable, "-m", "cli.main", "run", "--preset", "quick", "--seed",
                str(seed), "--data-dir", str(data_dir), "--experiment", "parallel", *extra]
        for item in SETS:
            args += ["--set", item]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=2400)[0] for p in procs]
    for seed, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"seed {seed} exited {p.returncode}:\n{out[-4000:]}"


def check_everything_recorded(client: MlflowClient, model_name: str) -> None:
    """N parent runs with their 6 stage runs each, all FINISHED, every param and every
    metric history complete, N registered model versions."""
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("layerwise.kind") == "pipeline"]
    assert len(parents) == N
    assert sorted(int(r.data.params["runtime.seed"]) for r in parents) == list(range(N))
    assert all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs if r.info.status != "FINISHED"]
    assert len(runs) == N * 7  # parent + 6 stages each
    n_params = {len(r.data.params) for r in parents}
    assert len(n_params) == 1 and n_params.pop() > 40  # the same full config in every parent
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 6
        for child in children:
            stage = child.data.tags["layerwise.stage"]
            if stage.startswith("finetune-"):
                arm = stage.split("-", 1)[1]
                for metric in ("val_error", "train_loss"):
                    hist = client.get_metric_history(child.info.run_id, f"finetune/{metric}")
                    assert [h.step for h in hist] == [0, 1, 2], (stage, metric)
            elif stage.startswith("pretrain-layer-"):
                k = stage.rsplit("-", 1)[1]
                hist = client.get_metric_history(child.info.run_id,
                                                 f"pretrain/layer_{k}/recon_loss")
                assert [h.step for h in hist] == [0, 1], stage
        assert {"test/error_pretrained", "test/error_random", "test/error_diff"} <= set(
            parent.data.metrics)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == N


@pytest.mark.slow
def test_eight_concurrent_runs_into_sqlite(tmp_path, shared_data_dir):
    env = {**os.environ, "LAYERWISE_HOME": str(tmp_path / "home"), "CI": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    wait_all(launch(env, shared_data_dir))
    check_everything_recorded(MlflowClient(f"sqlite:///{tmp_path}/home/mlflow.db"),
                              "layerwise-classifier")


@pytest.mark.slow
@pytest.mark.integration
def test_eight_concurrent_runs_into_the_postgres_backed_server(stack):  # noqa: F811
    env = client_env(stack)
    wait_all(launch(env, stack["data"], "--tracking-uri", stack["mlflow"],
                    "--model-name", "parallel-classifier"))
    check_everything_recorded(MlflowClient(stack["mlflow"]), "parallel-classifier")


@pytest.mark.slow
def test_two_identical_runs_at_once_on_one_home_both_succeed(tmp_path, shared_data_dir):
    """The same command twice at once into one LAYERWISE_HOME: both write the same stage
    folders. Checkpoints are byte-reproducible and published atomically, so neither finds
    the other's file "modified after it was written" (3 of 4 such pairs failed so when the
    safetensors header's order varied by process), and both report the same errors."""
    env = {**os.environ, "LAYERWISE_HOME": str(tmp_path / "home"), "CI": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "cli.main", "run", "--preset", "quick", "--data-dir",
            str(shared_data_dir), "--experiment", "twice"]
    for item in SETS:
        args += ["--set", item]
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
        assert "modified after it was written" not in out
    client = MlflowClient(f"sqlite:///{tmp_path}/home/mlflow.db")
    exp = client.get_experiment_by_name("twice")
    parents = [r for r in client.search_runs([exp.experiment_id])
               if r.data.tags.get("layerwise.kind") == "pipeline"]
    assert len(parents) == 2
    errors = {(r.data.metrics["test/error_pretrained"], r.data.metrics["test/error_random"])
              for r in parents}
    assert len(errors) == 1, errors

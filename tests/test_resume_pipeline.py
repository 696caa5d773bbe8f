"""Epoch checkpoints through the whole pipeline: a run killed in fine-tuning, in process or
with ``kill -9`` of its process group, and run again continues that stage from its last
checkpoint and ends with the uninterrupted run's weights and test errors."""

from __future__ import annotations

import pytest

from test_resume import Killed

TINY = ["data.n_train=300", "data.n_valid=100", "model.hidden_sizes=[16,8]",
        "pretrain.epochs=2", "finetune.max_epochs=4", "finetune.early_stopping=none"]


def _finetune_record(client, result, home):
    """Per arm: the digest of the fine-tuned tensors, the resume tag and the steps of its
    history. (The tensors' digest, not the file's: safetensors writes its header's
    metadata in an order that varies between processes.)"""
    from safetensors.torch import load_file

    from runtime.checkpoints import tensor_sha256

    record = {}
    for s in result.stages:
        if s.name.startswith("finetune-"):
            run = client.get_run(s.mlflow_run_id)
            steps = sorted(m.step for m in client.get_metric_history(s.mlflow_run_id,
                                                                      "finetune/val_error"))
            path, = home.glob(f"stages/finetune-twins-*/classifier_{s.name[9:]}.safetensors")
            record[s.name] = (tensor_sha256(load_file(path)),
                              run.data.tags.get("layerwise.resumed_from_epoch"), steps)
    return record


def test_a_pipeline_killed_in_finetuning_resumes_there_bit_identical(
        shared_data_dir, prefect_harness, tmp_path, monkeypatch):
    """Killed after fine-tuning's epoch 2 (in process: raised from the progress line), the
    same call again continues that stage from its checkpoint: the runs say
    ``resumed_from_epoch=2``, every epoch once, and the digests and test errors are the
    uninterrupted run's. No run is left RUNNING."""
    from mlflow.tracking import MlflowClient

    from config.overrides import resolve_config
    from flows.pipeline import run_pipeline
    from runtime.progress import ProgressLine

    config = resolve_config("quick", data_dir=shared_data_dir, sets=TINY)

    def run(home):
        monkeypatch.setenv("LAYERWISE_HOME", str(home))
        return run_pipeline(config, preset="quick", tracking_uri=f"sqlite:///{home}/mlflow.db",
                            experiment="resume")

    straight = run(tmp_path / "straight")
    real = ProgressLine.on_progress

    def kill_in_finetuning(self, epoch, *args):
        real(self, epoch, *args)
        if self.stage == "finetune-twins" and epoch == 1:
            raise Killed("killed in fine-tuning")

    monkeypatch.setattr(ProgressLine, "on_progress", kill_in_finetuning)
    with pytest.raises(Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(ProgressLine, "on_progress", real)
    resumed = run(tmp_path / "killed")

    a = _finetune_record(MlflowClient(straight.tracking_uri), straight, tmp_path / "straight")
    b = _finetune_record(MlflowClient(resumed.tracking_uri), resumed, tmp_path / "killed")
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    assert {v[1] for v in b.values()} == {"2"} and {v[1] for v in a.values()} == {None}
    assert all(v[2] == [0, 1, 2, 3] for v in b.values())
    assert (resumed.test_error_pretrained, resumed.test_error_random) == (
        straight.test_error_pretrained, straight.test_error_random)
    client = MlflowClient(resumed.tracking_uri)
    assert not client.search_runs([resumed.experiment_id], "attributes.status = 'RUNNING'")
    assert not list((tmp_path / "killed" / "stages").glob("*/resume"))


@pytest.mark.slow
def test_kill_9_during_quick_finetuning_then_the_same_command_resumes(shared_data_dir,
                                                                      tmp_path):
    """``kill -9`` of the whole process group once fine-tuning's third epoch is in MLflow;
    the same command again exits 0, resumes fine-tuning from epoch >= 3, leaves no run
    RUNNING and ends with the uninterrupted run's test errors."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def command(home):
        env = {**os.environ, "LAYERWISE_HOME": str(home), "PYTHONPATH": str(root)}
        env.pop("MLFLOW_TRACKING_URI", None)
        return [sys.executable, "-m", "cli.main", "run", "--preset", "quick", "--data-dir",
                str(shared_data_dir)], env

    def parent_metrics(home):
        with sqlite3.connect(home / "mlflow.db") as con:
            return dict(con.execute(
                "SELECT key, value FROM latest_metrics WHERE key LIKE 'test/error_%' AND "
                "run_uuid IN (SELECT run_uuid FROM runs WHERE status = 'FINISHED' ORDER BY "
                "start_time DESC LIMIT 1)"))

    args, env = command(tmp_path / "straight")
    subprocess.run(args, env=env, cwd=root, check=True, capture_output=True, timeout=900)
    home = tmp_path / "killed"
    args, env = command(home)
    proc = subprocess.Popen(args, env=env, cwd=root, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    query = ("SELECT count(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
             "WHERE m.key = 'finetune/val_error' AND r.status = 'RUNNING'")
    try:
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(home / "mlflow.db", timeout=5) as con:
                    if con.execute(query).fetchone()[0] >= 2 * 3:  # both arms, 3 epochs
                        break
            except sqlite3.Error:
                pass
            assert proc.poll() is None, "the run ended before fine-tuning's third epoch"
            time.sleep(0.2)
        else:
            pytest.fail("fine-tuning's third epoch never reached MLflow")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rerun = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with sqlite3.connect(home / "mlflow.db") as con:
        resumed = [int(v) for (v,) in con.execute(
            "SELECT value FROM tags WHERE key = 'layerwise.resumed_from_epoch'")]
        running = con.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()
    assert len(resumed) == 2 and min(resumed) >= 3, rerun.stdout
    assert running == (0,)
    assert parent_metrics(home) == parent_metrics(tmp_path / "straight")

"""An ablation cell's epochs in MLflow as they end: the run the flow opens, written from the
worker that trains the cell; each epoch once across retried and resumed attempts; a store
the worker cannot write to stops the live record, never the cell."""

from __future__ import annotations

import pytest

from tracking.live import LiveRun, RetriedLiveMetrics, complete_history, retried_live_metrics
from tracking.tracker import Tracker


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path / "home"))
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "live")


def _row(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "step": 10 * (epoch + 1), "train_loss": 1.0 / (epoch + 1),
            "val_error": 0.5 - epoch / 100}


def _steps(tracker: Tracker, run: str, key: str = "finetune/train_loss") -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run, key))


def test_a_retried_attempt_logs_each_epoch_once(tracker):
    run = tracker.start_run("cell", {})
    notes: list[str] = []
    first = RetriedLiveMetrics(tracker, {0: (run, "finetune")}, notes.append)
    for epoch in range(3):  # the first attempt logs epochs 0-2, then its worker is lost
        first.on_epoch_end(0, epoch, {k: v for k, v in _row(epoch).items() if k != "epoch"})
    assert _steps(tracker, run) == [0, 1, 2]
    # The retry resumes from the checkpoint of epoch 2 (epochs 0-1 done) and goes on.
    retry = RetriedLiveMetrics(tracker, {0: (run, "finetune")}, notes.append)
    retry.on_resume(0, 2, [_row(0), _row(1)])
    for epoch in (2, 3):
        retry.on_epoch_end(0, epoch, {k: v for k, v in _row(epoch).items() if k != "epoch"})
    assert _steps(tracker, run) == [0, 1, 2, 3]
    assert _steps(tracker, run, "finetune/val_error") == [0, 1, 2, 3]
    assert tracker.client.get_run(run).data.tags["layerwise.resumed_from_epoch"] == "2"
    assert run in retry.logged and not notes
    # When the cell settles, the flow logs only what the run does not hold.
    complete_history(tracker, run, "finetune", [_row(e) for e in range(5)])
    assert _steps(tracker, run) == [0, 1, 2, 3, 4]
    complete_history(tracker, run, "finetune", [_row(e) for e in range(5)])
    assert _steps(tracker, run) == [0, 1, 2, 3, 4]
    values = {m.step: m.value for m in tracker.client.get_metric_history(run, "finetune/train_loss")}
    assert values == {e: pytest.approx(1.0 / (e + 1)) for e in range(5)}


def test_a_cell_from_the_cache_gets_its_whole_history_when_it_settles(tracker):
    run = tracker.start_run("cell", {})
    complete_history(tracker, run, "finetune", [_row(e) for e in range(4)])
    assert _steps(tracker, run) == [0, 1, 2, 3]
    complete_history(tracker, run, "finetune", [])  # a cell that trained nothing
    assert _steps(tracker, run) == [0, 1, 2, 3]


def test_a_store_that_fails_stops_the_live_record_not_the_training(tracker, monkeypatch):
    run = tracker.start_run("cell", {})
    notes: list[str] = []
    live = RetriedLiveMetrics(tracker, {0: (run, "finetune")}, notes.append)
    live.on_epoch_end(0, 0, {"train_loss": 1.0})
    calls = []

    def locked(*args, **kwargs):
        calls.append(1)
        raise OSError("disk I/O error")

    monkeypatch.setattr(tracker.client, "log_batch", locked)
    for epoch in (1, 2, 3):
        live.on_epoch_end(0, epoch, {"train_loss": 1.0})  # never raises
    assert len(calls) == 1 and len(notes) == 1
    assert run in notes[0] and "disk I/O error" in notes[0] and "when the work settles" in notes[0]
    monkeypatch.undo()
    assert _steps(tracker, run) == [0]  # the flow completes it when the cell settles


def test_a_worker_without_the_sqlite_file_logs_nothing_live(tmp_path):
    missing = tmp_path / "elsewhere" / "mlflow.db"
    (tmp_path / "elsewhere").mkdir()
    live = {0: LiveRun(tracking_uri=f"sqlite:///{missing}", experiment="x", run_id="r")}
    assert retried_live_metrics(live, "finetune", print) is None
    assert not missing.exists()  # no store of its own beside the flow's
    assert retried_live_metrics({0: None}, "finetune", print) is None


def test_members_of_a_population_write_to_their_own_runs(tracker):
    runs = {p: tracker.start_run(f"seed-{p}", {}) for p in range(3)}
    live = retried_live_metrics(
        {p: LiveRun(tracking_uri=tracker.uri, experiment="live", run_id=runs[p])
         for p in (0, 2)} | {1: None}, "finetune", print)
    for epoch in range(2):
        for p in range(3):
            live.on_epoch_end(p, epoch, {"train_loss": float(p)})
    assert _steps(tracker, runs[0]) == _steps(tracker, runs[2]) == [0, 1]
    assert _steps(tracker, runs[1]) == []
    assert {m.value for m in tracker.client.get_metric_history(runs[2], "finetune/train_loss")
            } == {2.0}

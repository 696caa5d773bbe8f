"""``tracking.tracker.Tracker`` opening its experiment when other runs create it at once."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from tracking.tracker import Tracker


def test_a_run_that_loses_the_race_to_create_the_experiment_uses_the_winners(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    winner = Tracker(uri, "race")
    loser = Tracker(uri, "other")
    real, calls = loser.client.get_experiment_by_name, []

    def not_yet_then_real(name):  # the loser looked before the winner had created it
        calls.append(name)
        return None if len(calls) == 1 else real(name)

    loser.client.get_experiment_by_name = not_yet_then_real
    assert loser._get_or_create("race") == winner.experiment_id
    assert calls == ["race", "race"]


def test_any_other_failure_to_create_the_experiment_is_raised(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "x")
    tracker.client.get_experiment_by_name = lambda name: None

    def refuse(name, location=None, tags=None):
        raise MlflowException("permission denied", error_code="PERMISSION_DENIED")

    tracker.client.create_experiment = refuse
    with pytest.raises(MlflowException, match="permission denied"):
        tracker._get_or_create("y")


# ------------------------------------------------------- what a user meets in the MLflow UI

def test_experiments_are_marked_as_model_training_new_and_existing(tmp_path, monkeypatch):
    """Without ``mlflow.experimentKind`` MLflow 3 opens the experiment in its GenAI view."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path))
    uri = f"sqlite:///{tmp_path}/m.db"
    new = Tracker(uri, "new")
    old = MlflowClient(uri).create_experiment("old")  # made before the tag existed
    Tracker(uri, "old")
    for experiment_id in (new.experiment_id, old):
        tags = MlflowClient(uri).get_experiment(experiment_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_names_differ_where_the_runs_list_cuts_them():
    """The runs list shows about 18 characters: two runs a minute apart differ there."""
    from datetime import datetime, timedelta, timezone

    from tracking.conventions import run_name

    when = datetime(2026, 12, 7, 5, 47, 38, tzinfo=timezone.utc)
    names = [run_name("quick", 0, when + timedelta(minutes=m)) for m in (0, 1, 60 * 24)]
    assert names[0] == "quick-s0-1207-054738"
    assert len({n[:18] for n in names}) == 3
    assert len(run_name("default", 0, when)) <= 22  # was 28: default-seed0-20261207-054738


def test_the_parent_description_has_no_accidental_markdown_and_links_the_model_and_arms():
    import json
    import re
    from types import SimpleNamespace
    from urllib.parse import parse_qs, unquote, urlsplit

    from tracking.conventions import results_note, run_description

    model = SimpleNamespace(hidden_sizes=[64, 32], activation="sigmoid")
    config = SimpleNamespace(model=model, runtime=SimpleNamespace(seed=0),
                             data=SimpleNamespace(dataset="mnist", normalization="unit"))
    text = run_description("pipeline", "quick", config)
    assert "[" not in text and "hidden layers of 64, 32 units" in text
    note = results_note("7", ["a" * 32, "b" * 32], "layerwise-classifier", "3")
    links = dict(re.findall(r"\[([^\]]+)\]\(([^)\s]+)\)", note))
    assert links["layerwise-classifier version 3"] == "#/models/layerwise-classifier/versions/3"
    compare = urlsplit(links["compare finetune-pretrained with finetune-random"][1:])
    query = {k: (v[0] if k == "workflowType" else json.loads(unquote(v[0])))
             for k, v in parse_qs(compare.query).items()}
    assert compare.path == "/compare-runs"
    assert query == {"runs": ["a" * 32, "b" * 32], "experiments": ["7"],
                     "workflowType": "machine_learning"}  # not json: parse_qs keeps the str


def test_run_links_open_the_model_training_view():
    """MLflow 3's UI opens an experiment in its GenAI view unless the link asks otherwise."""
    from tracking.links import run_link

    link = run_link("http://127.0.0.1:5000", "1", "c" * 32)
    assert link == f"http://127.0.0.1:5000/#/experiments/1/runs/{'c' * 32}" \
                   "?workflowType=machine_learning"

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

"""``make screenshots`` (docs/screenshots.py) keeps its run away from a team's servers: with
``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` set to the team's, it still records into its
own servers and store, so nothing it registers reaches the registry ``promote`` reads."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEAM_API, TEAM_MLFLOW = "http://team-box:4200/api", "http://team-box:5000"


@pytest.fixture
def screenshots(monkeypatch):
    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs/screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("PREFECT_API_URL", TEAM_API)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TEAM_MLFLOW)
    return module


def test_screenshots_start_their_own_servers_even_with_a_teams_set(screenshots, monkeypatch,
                                                                   tmp_path):
    own = ("http://127.0.0.1:41001/api", "http://127.0.0.1:41002")
    used = {}
    monkeypatch.setattr(screenshots.shutil, "which", lambda name: "/usr/bin/chromium")
    monkeypatch.setattr(screenshots, "start_servers", lambda stack, tmp: own)

    def run_pipeline(api, mlflow, home):
        used.update(api=api, mlflow=mlflow)
        raise SystemExit("stop before any browser")

    monkeypatch.setattr(screenshots, "run_pipeline", run_pipeline)
    monkeypatch.setattr(sys, "argv", ["screenshots.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        screenshots.main()
    assert used == {"api": own[0], "mlflow": own[1]}


def test_the_runs_environment_names_only_the_private_servers(screenshots, tmp_path):
    env = screenshots.pipeline_env("http://127.0.0.1:1/api", "http://127.0.0.1:2",
                                   tmp_path / "home")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:2"
    assert env["LAYERWISE_HOME"] == str(tmp_path / "home")
    assert TEAM_API not in env.values() and TEAM_MLFLOW not in env.values()

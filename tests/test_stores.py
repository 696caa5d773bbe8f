"""Where a run's stores go when ``LAYERWISE_HOME`` is not set: never into the code
directory for a worker's run (which starts in the checkout), ``./mlruns`` of the current
directory for a run a user starts there, and ``make deploy``'s default for a worker is the
user's data directory."""

import os
import subprocess
from pathlib import Path

import pytest

from runtime.home import layerwise_home

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LAYERWISE_HOME", raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    saved = dict(os.environ)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def test_a_workers_flow_run_in_the_checkout_writes_to_the_user_data_dir(no_home, monkeypatch):
    monkeypatch.chdir(ROOT)  # prefect.yaml's pull step: the worker's run starts here
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5d3c3e-1f0e-4a55-9a3c-000000000001")
    home = layerwise_home()
    assert home == no_home / "xdg" / "layerwise"
    assert not home.is_relative_to(ROOT)


def test_without_xdg_the_user_data_dir_is_under_local_share(no_home, monkeypatch):
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(no_home))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5d3c3e-1f0e-4a55-9a3c-000000000001")
    assert layerwise_home() == no_home / ".local" / "share" / "layerwise"


def test_a_run_started_elsewhere_uses_mlruns_there_and_the_variable_wins(no_home, monkeypatch):
    monkeypatch.chdir(no_home)
    assert layerwise_home() == no_home / "mlruns"
    monkeypatch.setenv("LAYERWISE_HOME", str(no_home / "stores"))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5d3c3e-1f0e-4a55-9a3c-000000000001")
    assert layerwise_home() == no_home / "stores"


def test_schedule_serve_pins_its_shells_stores_for_its_flow_runs(no_home, monkeypatch):
    from runtime.serving import serve_environment

    monkeypatch.chdir(no_home)
    serve_environment()
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b5d3c3e-1f0e-4a55-9a3c-000000000001")
    assert layerwise_home() == no_home / "mlruns"  # as docs/service.md says: its shell's
    assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(no_home / "mlruns/prefect-results")


def test_make_deploy_gives_a_worker_stores_outside_the_checkout(no_home):
    """The Makefile's default for the flow runs' ``LAYERWISE_HOME``, evaluated by make."""
    (line,) = [ln for ln in (ROOT / "Makefile").read_text().splitlines()
               if ln.startswith("deploy: export LAYERWISE_HOME ?=")]
    probe = f"X := {line.split('?=', 1)[1].strip()}\nall:\n\t@echo $(X)\n"
    env = {**os.environ, "HOME": str(no_home)}
    for xdg, expected in ((None, no_home / ".local/share/layerwise"),
                          (str(no_home / "xdg"), no_home / "xdg/layerwise")):
        env.pop("XDG_DATA_HOME", None)
        if xdg:
            env["XDG_DATA_HOME"] = xdg
        out = subprocess.run(["make", "-s", "-f", "-"], input=probe, cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert Path(out) == expected and not Path(out).is_relative_to(ROOT)

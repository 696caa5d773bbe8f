"""The ephemeral Prefect API server of a CLI run: it dies with the run that started it
(``runtime.orphan_guard``, checked on a stand-in server: a parent that starts ``python -m
runtime.orphan_guard PID -m http.server``, killed with SIGKILL as a run killed by ``kill -9`` or
the OOM killer is), and a local process pool's workers use it rather than starting their own
(``runtime.ephemeral_api``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime import orphan_guard

REPO = Path(__file__).resolve().parents[1]

PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "runtime.orphan_guard", str(os.getpid()),
                          "-m", "http.server", "0", "--bind", "127.0.0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; only its entry is left
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_guarded_server_lives_with_its_parent_and_dies_after_kill_9():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        server = int(parent.stdout.readline())
        time.sleep(4 * orphan_guard.POLL_S)
        assert alive(server)  # the watch does not fire while the parent lives
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        # SIGTERM within a poll; uvicorn and http.server stop on it (SIGKILL after GRACE_S)
        assert wait_until(lambda: not alive(server), orphan_guard.GRACE_S + 5)
    finally:
        parent.kill()


def test_only_the_uvicorn_command_is_rewritten_and_install_is_idempotent(monkeypatch):
    uvicorn = orphan_guard._GuardedPopen([sys.executable, "-m", "uvicorn", "--version"],
                                         cwd=REPO, stdout=subprocess.PIPE, text=True)
    out, _ = uvicorn.communicate(timeout=60)
    assert uvicorn.args == [sys.executable, "-m", "runtime.orphan_guard", str(os.getpid()),
                            "-m", "uvicorn", "--version"]
    assert uvicorn.returncode == 0 and "uvicorn" in out.lower()  # the module really ran
    other = orphan_guard._GuardedPopen([sys.executable, "-c", "pass"])
    assert other.wait(timeout=30) == 0 and other.args == [sys.executable, "-c", "pass"]

    from prefect.server.api import server

    monkeypatch.setattr(server, "subprocess", subprocess)
    orphan_guard.install()
    shim = server.subprocess
    orphan_guard.install()
    assert server.subprocess is shim and shim.Popen is orphan_guard._GuardedPopen
    assert shim.TimeoutExpired is subprocess.TimeoutExpired and shim.PIPE == subprocess.PIPE


def test_a_guard_whose_parent_is_already_gone_exits_at_once():
    proc = subprocess.run([sys.executable, "-m", "runtime.orphan_guard", "1", "-m", "http.server"],
                          cwd=REPO, capture_output=True, timeout=30)
    assert proc.returncode == 1
    bad = subprocess.run([sys.executable, "-m", "runtime.orphan_guard", "123"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "usage" in bad.stderr


SHARED = """
import json, os
from prefect import flow, task
from prefect.settings import get_current_settings, temporary_settings

@task
def probe():
    from prefect.server.api.server import SubprocessASGIServer
    import threading
    guarded = any(t.name == "orphan-guard" for t in threading.enumerate())
    return (os.getpid(), get_current_settings().api.url, len(SubprocessASGIServer._instances),
            guarded)

@flow
def fan_out():
    return [f.result() for f in [probe.submit() for _ in range(4)]]

if __name__ == "__main__":
    from cli.common import prepare_environment
    prepare_environment()  # as the CLI does: guarded, and started in the background
    from flows.ablation import task_runner
    from runtime.ephemeral_api import shared_settings
    from prefect.server.api.server import SubprocessASGIServer
    assert shared_settings(False) == {}  # one worker or a Dask cluster: nothing to hand out
    server = SubprocessASGIServer()
    import urllib.request  # ready() waited: it answers before any Prefect client asked
    assert urllib.request.urlopen(server.api_url + "/health", timeout=5).status == 200
    settings = shared_settings(True)
    with temporary_settings(settings):
        probes = fan_out.with_options(task_runner=task_runner(2))()
    with open(f"/proc/{server.server_process.pid}/cmdline", "rb") as f:
        cmdline = f.read().decode().split(chr(0))
    print(json.dumps({"pid": os.getpid(), "urls": [str(v) for v in settings.values()],
                      "server": server.api_url, "cmdline": cmdline, "probes": probes}))
"""


@pytest.mark.slow  # 40 s: a process pool around a real ephemeral server
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_process_pool_workers_use_the_runs_one_guarded_ephemeral_server(tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(SHARED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["urls"] == [out["server"]]
    assert out["cmdline"][1:4] == ["-m", "runtime.orphan_guard", str(out["pid"])]
    workers = {pid for pid, *_ in out["probes"]}
    assert len(out["probes"]) == 4 and out["pid"] not in workers  # they ran in the pool
    for _, url, servers, guarded in out["probes"]:
        assert url == out["server"] and servers == 0  # no worker started a server of its own
        assert guarded  # and each watches the run (runtime.orphan_guard.watch_parent)


POOL = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from runtime.orphan_guard import watch_parent
pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                           initializer=watch_parent, initargs=(os.getpid(),))
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 600)  # busy in a task when the parent dies
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_watched_pool_worker_stops_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", POOL], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        time.sleep(4 * orphan_guard.POLL_S)
        assert alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert wait_until(lambda: not alive(worker), orphan_guard.GRACE_S + 5)
    finally:
        parent.kill()
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_background_start_that_times_out_twice_is_raised_by_ready_once(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from runtime import ephemeral_api
    from runtime.errors import TrackingError

    waits = []

    def boom(self, timeout=None):
        waits.append(timeout)
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API")

    monkeypatch.setattr(ephemeral_api, "configured", lambda: False)
    monkeypatch.setattr(orphan_guard, "install", lambda: None)
    monkeypatch.setattr(SubprocessASGIServer, "start", boom)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    ephemeral_api.prestart()
    with pytest.raises(TrackingError, match="PREFECT_API_URL") as err:
        ephemeral_api.ready()
    first = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    assert waits == [None, 2 * first]  # Prefect's own wait, then one twice as long
    assert f"within {first} s, nor within {2 * first} s" in str(err.value)
    ephemeral_api.ready()  # reported once; nothing left to wait for


def test_a_start_that_times_out_once_is_retried_and_succeeds(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    from runtime import ephemeral_api

    waits = []

    def slow_then_fine(self, timeout=None):
        waits.append(timeout)
        if len(waits) == 1:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API")

    monkeypatch.setattr(ephemeral_api, "configured", lambda: False)
    monkeypatch.setattr(orphan_guard, "install", lambda: None)
    monkeypatch.setattr(SubprocessASGIServer, "start", slow_then_fine)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    ephemeral_api.prestart()
    ephemeral_api.ready()  # no error: the second, longer try answered
    assert len(waits) == 2 and waits[1] > 0

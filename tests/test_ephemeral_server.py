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


def run_script(text: str, tmp_path: Path) -> dict:
    """Run ``text`` as a script in a fresh process with no Prefect API configured and its own
    Prefect home; the JSON of its last line."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


STARTED = """
import json, os, sys, urllib.request
from cli.common import prepare_environment
prepare_environment()  # as the CLI does: started in the background, before the imports
import lightning  # noqa: F401  the imports that overlap the server's boot
from runtime import ephemeral_api
ephemeral_api.ready()
from prefect.settings import get_current_settings
url = ephemeral_api.api_url()
assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
pid = ephemeral_api._server.process.pid
with open(f"/proc/{pid}/cmdline", "rb") as f:
    cmdline = f.read().decode().split(chr(0))
print(json.dumps({"pid": os.getpid(), "server_pid": pid, "url": url,
                  "env": os.environ["PREFECT_API_URL"], "settings": get_current_settings().api.url,
                  "cmdline": cmdline, "server_imported": "prefect.server.api.server" in sys.modules}))
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_runs_server_is_guarded_used_by_prefect_and_stopped_at_exit(tmp_path):
    """The run starts Prefect's server command under the guard, without importing Prefect's
    server itself; Prefect's settings point at it; it is gone when the run exits."""
    out = run_script(STARTED, tmp_path)
    assert out["url"] == out["env"] == out["settings"]
    assert out["url"].startswith("http://127.0.0.1:") and out["url"].endswith("/api")
    assert out["cmdline"][1:6] == ["-m", "runtime.orphan_guard", str(out["pid"]), "-m",
                                   "uvicorn"]
    assert "prefect.server.api.server:create_app" in out["cmdline"]
    assert not out["server_imported"]  # the point: ≈ 3 s of imports the run does not need
    assert wait_until(lambda: not alive(out["server_pid"]), 10)  # stopped at exit


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
    import sys, threading
    guarded = any(t.name == "orphan-guard" for t in threading.enumerate())
    return (os.getpid(), get_current_settings().api.url,
            "prefect.server.api.server" in sys.modules, guarded)

@flow
def fan_out():
    return [f.result() for f in [probe.submit() for _ in range(4)]]

if __name__ == "__main__":
    from cli.common import prepare_environment
    prepare_environment()  # as the CLI does: guarded, and started in the background
    from flows.ablation import task_runner
    from runtime import ephemeral_api
    assert ephemeral_api.shared_settings(False) == {}  # one worker or Dask: nothing to hand out
    import urllib.request  # ready() waited: it answers before any Prefect client asked
    url = ephemeral_api.api_url()
    assert urllib.request.urlopen(url + "/health", timeout=5).status == 200
    settings = ephemeral_api.shared_settings(True)
    with temporary_settings(settings):
        probes = fan_out.with_options(task_runner=task_runner(2))()
    with open(f"/proc/{ephemeral_api._server.process.pid}/cmdline", "rb") as f:
        cmdline = f.read().decode().split(chr(0))
    print(json.dumps({"pid": os.getpid(), "urls": [str(v) for v in settings.values()],
                      "server": url, "cmdline": cmdline, "probes": probes}))
"""


@pytest.mark.slow  # 40 s: a process pool around a real ephemeral server
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_process_pool_workers_use_the_runs_one_guarded_ephemeral_server(tmp_path):
    out = run_script(SHARED, tmp_path)
    assert out["urls"] == [out["server"]]
    assert out["cmdline"][1:4] == ["-m", "runtime.orphan_guard", str(out["pid"])]
    workers = {pid for pid, *_ in out["probes"]}
    assert len(out["probes"]) == 4 and out["pid"] not in workers  # they ran in the pool
    for _, url, server_imported, guarded in out["probes"]:
        assert url == out["server"] and not server_imported  # no worker started its own
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


@pytest.fixture
def fake_server(monkeypatch):
    """``runtime.ephemeral_api`` with a stand-in ``_Server`` whose ``wait`` follows a script
    (``fake_server.outcomes``: None answers, an exception is raised); the URLs Prefect would
    be pointed at are recorded in ``fake_server.pointed`` (the real pointing is checked in a
    process of its own, above: it changes Prefect's process-wide settings)."""
    from runtime import ephemeral_api

    class Fake:
        outcomes: list = []
        waits: list = []
        pointed: list = []
        starts = 0

        def __init__(self):
            self.process, self.port, self.started = None, 0, 0.0

        api_url = property(lambda self: f"http://127.0.0.1:{self.port}/api")

        def start(self):
            Fake.starts += 1
            self.port = 8000 + Fake.starts

        def wait(self, timeout):
            Fake.waits.append(timeout)
            outcome = Fake.outcomes.pop(0)
            if outcome is not None:
                raise outcome

        def stop(self):
            pass

        def keep_alive(self):
            Fake.kept_alive += 1

    Fake.outcomes, Fake.waits, Fake.pointed, Fake.starts = [], [], [], 0
    Fake.kept_alive = 0
    monkeypatch.setattr(ephemeral_api, "_Server", Fake)
    monkeypatch.setattr(ephemeral_api, "_server", None)
    monkeypatch.setattr(ephemeral_api, "configured", lambda: False)
    monkeypatch.setattr(ephemeral_api, "_point_prefect_at",
                        lambda server: Fake.pointed.append(server.api_url))
    monkeypatch.setattr(ephemeral_api.atexit, "register", lambda f: None)
    return Fake


def test_a_start_that_times_out_twice_is_raised_by_ready_once(fake_server):
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from runtime import ephemeral_api
    from runtime.errors import TrackingError

    fake_server.outcomes = [TimeoutError("no answer"), TimeoutError("no answer")]
    ephemeral_api.prestart()
    assert fake_server.pointed == ["http://127.0.0.1:8001/api"]
    with pytest.raises(TrackingError, match="PREFECT_API_URL") as err:
        ephemeral_api.ready()
    first = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    assert fake_server.waits == [first, 2 * first]  # Prefect's own wait, then twice as long
    assert "did not start: no answer, and again on a second try: no answer" in str(err.value)
    assert fake_server.kept_alive == 0  # nothing to keep alive
    ephemeral_api.ready()  # reported once; nothing left to wait for


def test_a_start_that_times_out_once_is_retried_and_succeeds(fake_server):
    from runtime import ephemeral_api

    fake_server.outcomes = [TimeoutError("no answer"), None]
    ephemeral_api.prestart()
    ephemeral_api.ready()  # no error: the second, longer try answered
    assert fake_server.starts == 2 and len(fake_server.waits) == 2
    assert fake_server.kept_alive == 1  # restarted on its port should it die mid-run
    # Prefect is pointed at the first server, then at the second one's port
    assert fake_server.pointed == ["http://127.0.0.1:8001/api", "http://127.0.0.1:8002/api"]
    ephemeral_api.prestart()  # started once per process
    assert fake_server.starts == 2

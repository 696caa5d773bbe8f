"""Faults of the world (``runtime.faults``): a full disk and a tracking server that dies
end a run in seconds with one line saying what happened and how to resume, never as a
"bug" with tracebacks; a half-written file is never left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.checkpoints import atomic_write, save_state
from runtime.errors import ResourceError, TrackingError
from runtime.faults import resource_error, server_error, unreachable
from server_stack import free_port, http_status

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "data.n_train=1000", "--set", "model.hidden_sizes=[64,32]",
         "--set", "pretrain.epochs=2", "--set", "finetune.max_epochs=3"]


def test_a_full_disk_while_writing_a_checkpoint_is_a_resource_error(tmp_path):
    """safetensors reports ENOSPC as its own ``SafetensorError``, with the OSError's text."""
    from safetensors import SafetensorError

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    with pytest.raises(ResourceError, match="no space left on the disk of .*free some space"):
        atomic_write(tmp_path / "stage" / "dae.safetensors", write)
    assert list((tmp_path / "stage").iterdir()) == []  # no partial file, no temporary


def test_resource_errors_are_found_anywhere_in_the_chain(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError as inner:
            raise RuntimeError("while logging the model") from inner
    except RuntimeError as exc:
        found = resource_error(exc)
    assert isinstance(found, ResourceError) and str(tmp_path / "x") in str(found)
    assert "MB free" in str(found)
    assert "read-only" in str(resource_error(OSError(errno.EROFS, "Read-only file system")))
    assert "out of memory" in str(resource_error(RuntimeError(
        "DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB")))
    assert resource_error(ValueError("a bug")) is None


def test_a_server_that_is_gone_is_told_apart_from_a_bug(tmp_path):
    refused = ConnectionRefusedError(111, "Connection refused")
    wrapped = RuntimeError("API request to http://h/api/2.0/mlflow/runs/log-batch failed: "
                           "Max retries exceeded with url")
    wrapped.__cause__ = refused
    assert unreachable(wrapped) == "connection refused"
    found = server_error(wrapped, "http://127.0.0.1:5000", tmp_path)
    assert isinstance(found, TrackingError)
    assert "http://127.0.0.1:5000" in str(found) and "rerun the same command" in str(found)
    assert server_error(KeyError("x"), "u", tmp_path) is None


def test_the_cli_prints_a_full_disk_as_one_line_without_traceback(monkeypatch, tmp_path,
                                                                  shared_data_dir):
    """The CLI's error path (``cli.common.guarded_work``), given what a full disk raises
    deep inside Prefect or MLflow."""
    import flows.pipeline
    from cli.main import app

    def full(*args, **kwargs):
        raise RuntimeError("log_artifact failed") from OSError(errno.ENOSPC, "No space left "
                                                                "on device", str(tmp_path))

    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(flows.pipeline, "run_pipeline", full)
    monkeypatch.setattr("cli.main.prepare_environment", lambda: None)
    result = CliRunner().invoke(app, ["run", "--preset", "quick", "--data-dir",
                                      str(shared_data_dir)])
    assert result.exit_code == 1, result.output
    assert "no space left on the disk" in result.output
    assert "Traceback" not in result.output and "bug" not in result.output


def _run(home: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LAYERWISE_HOME": str(home), "PYTHONUNBUFFERED": "1", "CI": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "cli.main", "run", "--preset", "quick",
                             "--data-dir", str(data_dir), *SMALL, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until(proc: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError("the run ended before " + marker + ":\n" + "".join(lines))


@pytest.mark.slow
def test_a_tracking_server_that_dies_ends_the_run_in_seconds(tmp_path, shared_data_dir):
    """The MLflow server is killed after the first layer: the run ends within a bounded
    time (MLflow's own retries took about 25 minutes), exit 1, with one line saying what
    is kept and that rerunning resumes; no traceback."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while http_status(f"http://127.0.0.1:{port}/health") != 200:
            assert time.monotonic() < deadline and server.poll() is None, "no MLflow server"
            time.sleep(0.5)
        proc = _run(tmp_path / "home", shared_data_dir, "--tracking-uri",
                    f"http://127.0.0.1:{port}")
        lines = _until(proc, "done  pretrain-layer-1")
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=600)
        seconds = time.monotonic() - killed
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    output = "".join(lines) + out
    assert proc.returncode == 1, output
    assert "stopped answering" in output and "rerun the same command" in output, output
    assert "Traceback" not in output and "bug" not in output, output
    assert seconds < 120, output


@pytest.mark.slow
def test_a_disk_that_fills_during_the_run_is_a_clear_error(tmp_path, shared_data_dir):
    """LAYERWISE_HOME on a real tmpfs, filled by another process after the first layer."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs (the unit tests above "
                    "simulate ENOSPC instead)")
    try:
        proc = _run(mnt / "home", shared_data_dir)
        lines = _until(proc, "done  pretrain-layer-1")
        with open(mnt / "filler", "wb") as fh:  # fill the disk to the last byte
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        out, _ = proc.communicate(timeout=600)
        output = "".join(lines) + out
        assert proc.returncode == 1, output
        assert "no space left on the disk" in output, output
        assert "Traceback" not in output and "bug" not in output, output
        assert not list((mnt / "home").rglob("*.tmp")), output
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _server_pid(run_pid: int) -> int:
    """The pid of the run's guarded Prefect API server (``runtime.orphan_guard``)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runtime.orphan_guard" in cmd and str(run_pid).encode() in cmd:
            return int(proc.name)
    raise AssertionError(f"no Prefect API server of run {run_pid}")


@pytest.mark.slow
def test_the_runs_prefect_server_dying_mid_run_is_restarted_and_the_run_completes(
        tmp_path, shared_data_dir):
    """SIGKILL to the run's ephemeral Prefect API server after the first layer: it is
    started again on its port (its database holds the flow run), the run finishes, prints
    its test errors and exits 0. Before, it waited 3.5 minutes and ended as a bug."""
    proc = _run(tmp_path / "home", shared_data_dir)
    lines = _until(proc, "done  pretrain-layer-1")
    os.kill(_server_pid(proc.pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    output = "".join(lines) + out
    assert proc.returncode == 0, output
    assert "restarting it on port" in output and "test error" in output, output
    assert "Traceback" not in output and "bug" not in output, output

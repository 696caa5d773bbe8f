"""Screenshots of one small pipeline run in the MLflow and Prefect UIs, taken with headless
Chromium: the MLflow run page, the registered model's page, and the Prefect flow run's page
with its logs. ``make screenshots`` (``OUT=folder``; default ``screenshots/``).

It never touches a team's servers: it always starts its own Prefect and MLflow servers on
free loopback ports with SQLite stores in a temporary folder (the Prefect UI then needs
``PREFECT_SERVER_UI_API_URL``, as on any port but 4200), ignores ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI``, and stops and deletes them at the end; so no run, experiment or
model version of it reaches a registry that ``layerwise promote`` reads. It lives beside the docs because that is what the pictures are for: a look at what a
user meets, checked by eye before a change to the record or the logs is merged. Needs
``chromium`` (Debian: ``apt-get install chromium``) and MNIST (``LAYERWISE_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["data.n_train=2000", "model.hidden_sizes=[64,32]", "pretrain.epochs=1",
        "finetune.max_epochs=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"error: the server for {url} exited ({process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"error: {url} not healthy after {timeout:.0f} s")


def start_servers(stack: ExitStack, tmp: Path) -> tuple[str, str]:
    """A Prefect and an MLflow server on SQLite in ``tmp``; stopped when ``stack`` closes."""
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_API_URL": api}  # the browser asks this port, not 4200
    servers = [
        (subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                           "--port", str(prefect_port)], env=env, cwd=tmp,
                          stdout=open(tmp / "prefect.log", "wb"), stderr=subprocess.STDOUT),
         f"{api}/health"),
        (subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                           str(mlflow_port), "--workers", "1", "--backend-store-uri",
                           f"sqlite:///{tmp}/mlflow.db", "--serve-artifacts",
                           "--artifacts-destination", str(tmp / "artifacts")], cwd=tmp,
                          stdout=open(tmp / "mlflow.log", "wb"), stderr=subprocess.STDOUT),
         f"http://127.0.0.1:{mlflow_port}/health"),
    ]
    for process, _ in servers:
        stack.callback(lambda p=process: (p.terminate(), p.wait(20)))
    for process, health in servers:
        wait_healthy(health, process)
    return api, f"http://127.0.0.1:{mlflow_port}"


def pipeline_env(api: str, mlflow: str, home: Path) -> dict[str, str]:
    """The run's environment: the user's, with the private servers and store in place of
    any the shell names (a team's ``PREFECT_API_URL``/``MLFLOW_TRACKING_URI``)."""
    return {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow,
            "LAYERWISE_HOME": str(home)}


def run_pipeline(api: str, mlflow: str, home: Path) -> tuple[str, str, str]:
    """``layerwise run`` of a small config against the private servers; returns the MLflow
    run and experiment ids and the registered model's name."""
    env = pipeline_env(api, mlflow, home)
    sets = [a for s in TINY for a in ("--set", s)]
    out = subprocess.run([str(BIN / "layerwise"), "run", "--preset", "quick", *sets,
                          "--tracking-uri", mlflow],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    print(out.stdout, end="")
    if out.returncode:
        raise SystemExit(f"error: layerwise run failed:\n{out.stderr[-3000:]}")
    run_id, experiment = re.search(r"MLflow run ([0-9a-f]{32}) \(experiment (\d+)\)",
                                   out.stdout).groups()
    model = re.search(r"model (\S+) v\d+", out.stdout).group(1)
    return run_id, experiment, model


def flow_run_id(api: str, name: str) -> str:
    """The Prefect flow run that carries the MLflow run's name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[name])))
    return str(run.id)


def screenshot(chromium: str, url: str, path: Path, height: int = 1100) -> None:
    """One page, after its scripts ran (the UIs are single-page apps)."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size=1500,{height}",
                    "--virtual-time-budget=20000", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path}  <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("error: chromium not found; install it (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layerwise-ui-")))
        api, mlflow = start_servers(stack, tmp)  # never the shell's (a team's) servers
        run_id, experiment, model = run_pipeline(api, mlflow, tmp / "home")
        from mlflow.tracking import MlflowClient

        name = MlflowClient(mlflow).get_run(run_id).info.run_name
        ui = api.rstrip("/").removesuffix("/api")
        screenshot(chromium, f"{mlflow}/#/experiments/{experiment}/runs/{run_id}",
                   args.out / "mlflow-run.png")
        screenshot(chromium, f"{mlflow}/#/models/{model}", args.out / "mlflow-model.png")
        screenshot(chromium, f"{ui}/runs/flow-run/{flow_run_id(api, name)}",
                   args.out / "prefect-flow-run.png", height=1400)


if __name__ == "__main__":
    main()

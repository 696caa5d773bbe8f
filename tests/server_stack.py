"""The servers of the compose stack, natively, for the tests that need them: the very
commands docker-compose.yml runs (parsed out of it, with only hosts, ports, paths and
database names substituted) against this machine's PostgreSQL (``postgres``), a Prefect and
an MLflow server on it (``stack``), and the helpers to start, reach and stop processes.

Needs PostgreSQL on 127.0.0.1:5432 where user ``postgres`` may create databases (override
with LAYERWISE_TEST_PG_HOST / _PORT / _USER / _DB). Every database it creates has a random
name and is dropped at the end; every process it starts is stopped.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from test_compose import ROOT, argv, compose, read_env_file, ENV_EXAMPLE

BIN = Path(sys.executable).parent
TINY = ["data.n_train=1000", "model.hidden_sizes=[32,16]", "pretrain.epochs=1",
        "finetune.max_epochs=1"]
STAGES = {"load-data", "pretrain-layer-1", "pretrain-layer-2", "finetune-pretrained",
          "finetune-random", "evaluate"}
PG = {"host": os.environ.get("LAYERWISE_TEST_PG_HOST", "127.0.0.1"),
      "port": int(os.environ.get("LAYERWISE_TEST_PG_PORT", "5432")),
      "user": os.environ.get("LAYERWISE_TEST_PG_USER", "postgres"),
      "dbname": os.environ.get("LAYERWISE_TEST_PG_DB", "test")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, auth: tuple[str, str] | None = None, timeout: float = 5) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Process:
    """A subprocess in its own process group, logged to a file, stopped with its children."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path,
                 cwd: Path = ROOT):
        self.name, self.log = name, log
        self._file = open(log, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before {what}:\n"
                            f"{self.tail()}")
            time.sleep(0.5)
        pytest.fail(f"{self.name}: no {what} after {timeout:.0f} s; its log:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 8) -> None:
        stop_all([self], timeout)


def stop_all(processes: list[Process], timeout: float = 8) -> None:
    """SIGTERM to every group at once, SIGKILL to what is left after ``timeout``."""
    for p in processes:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.signal(signal.SIGKILL)
            p.proc.wait(10)
        p._file.close()


# ---------------------------------------------------------------- databases and servers

@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    """An admin connection to the local PostgreSQL that creates and drops test databases."""
    import psycopg2  # a dependency of the project (MLflow's PostgreSQL backend)
    try:
        conn = psycopg2.connect(**PG, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL not reachable at {PG['host']}:{PG['port']}: {exc}")
    conn.autocommit = True
    created: list[str] = []

    def create(purpose: str) -> str:
        name = f"lw_test_{purpose}_{secrets.token_hex(4)}"
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return name

    yield create
    with conn.cursor() as cur:
        for name in created:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def local_db_url(url: str, database: str) -> str:
    """The compose URL (``...@postgres:5432/mlflow``) pointed at the local server and a
    fresh database; the credentials stay as the compose file builds them."""
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == ("postgres", 5432), url
    userinfo = parts.netloc.rsplit("@", 1)[0]
    return f"{parts.scheme}://{userinfo}@{PG['host']}:{PG['port']}/{database}"


def native(args: list[str], **options: str) -> list[str]:
    """A compose command for this machine: the executable from this venv and each named
    option's value replaced (the option must be there, so the two cannot drift apart)."""
    args = list(args)
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        assert flag in args, f"{flag} no longer in the compose command {args}"
        args[args.index(flag) + 1] = value
    args[0] = str(BIN / args[0])
    return args


def compose_env(**overrides: str) -> dict[str, str]:
    """.env.example with what this machine needs: the local superuser (trust auth, so the
    password is never checked), fresh secrets and free host ports."""
    return {**read_env_file(ENV_EXAMPLE), "POSTGRES_USER": PG["user"],
            "POSTGRES_PASSWORD": secrets.token_hex(8),
            "MLFLOW_ADMIN_PASSWORD": secrets.token_hex(8), "MLFLOW_WORKERS": "1",
            **overrides}


def auth_ini(tmp: Path) -> Path:
    """docker/mlflow/basic_auth.ini with its SQLite user store moved from the container's
    volume into ``tmp``. MLflow reads it even without logins (its runs/search handler
    imports the auth app when Flask-WTF is installed), so both servers get it."""
    text = (ROOT / "docker" / "mlflow" / "basic_auth.ini").read_text()
    assert "sqlite:////var/lib/mlflow/auth/" in text
    path = tmp / "basic_auth.ini"
    path.write_text(text.replace("sqlite:////var/lib/mlflow/auth/", f"sqlite:///{tmp}/"))
    return path


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "LAYERWISE_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               CI="1")
    return env


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory, shared_data_dir) -> Iterator[dict[str, Any]]:
    """The Prefect and MLflow servers of docker-compose.yml on free loopback ports."""
    tmp = tmp_path_factory.mktemp("servers")
    mp = pytest.MonkeyPatch()  # this process's MLflow client: fail fast, not minutes of retries
    mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    mlflow_port, prefect_port = free_port(), free_port()
    env = compose_env(MLFLOW_PORT=str(mlflow_port), PREFECT_PORT=str(prefect_port))
    services = compose(env)["services"]
    started: list[Process] = []
    try:
        mlflow_db, prefect_db = postgres("mlflow"), postgres("prefect")
        svc = services["mlflow"]
        cmd = argv(svc["command"])
        artifacts = tmp / "mlflow-artifacts"
        mlflow_args = native(cmd, host="127.0.0.1", port=str(mlflow_port),
                             artifacts_destination=str(artifacts),
                             backend_store_uri=local_db_url(
                                 cmd[cmd.index("--backend-store-uri") + 1], mlflow_db))
        mlflow_env = {**base_env(tmp), **svc["environment"],
                      "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini(tmp))}
        started.append(Process("mlflow server", mlflow_args, mlflow_env, tmp / "mlflow.log",
                               cwd=tmp))

        svc = services["prefect-server"]
        prefect_env = {**base_env(tmp), **svc["environment"],
                       "PREFECT_HOME": str(tmp / "prefect-server-home")}
        url = prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = local_db_url(url, prefect_db)
        prefect_args = native(argv(svc["command"]), host="127.0.0.1", port=str(prefect_port))
        started.append(Process("prefect server", prefect_args, prefect_env,
                               tmp / "prefect.log", cwd=tmp))

        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        api_url = f"http://127.0.0.1:{prefect_port}/api"
        started[1].wait_for(lambda: http_status(f"{api_url}/health") == 200, 180,
                            "a healthy /api/health")
        started[0].wait_for(lambda: http_status(f"{mlflow_url}/health") == 200, 180,
                            "a healthy /health")
        yield {"tmp": tmp, "env": env, "mlflow": mlflow_url, "api": api_url,
               "artifacts": artifacts, "mlflow_db": mlflow_db, "data": shared_data_dir,
               "home": tmp / "layerwise-home", "processes": started}
    finally:
        stop_all(started)
        mp.undo()


def client_env(stack: dict[str, Any]) -> dict[str, str]:
    """What a user's shell has: both servers, a private LAYERWISE_HOME."""
    env = base_env(stack["tmp"])
    env.update(PREFECT_API_URL=stack["api"], LAYERWISE_HOME=str(stack["home"]))
    return env


@contextmanager
def prefect_api(stack: dict[str, Any]) -> Iterator[Any]:
    """A Prefect client of the test server, in this process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack["api"]}):
        with get_client(sync_client=True) as client:
            yield client


def mlflow_client(stack: dict[str, Any]) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack["mlflow"])


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@functools.lru_cache(maxsize=None)
def python_cli(module: str) -> tuple[str, ...]:
    """``layerwise`` with ``module``'s ``register(app)`` sub-commands, for as long as
    cli/main.py does not wire them in yet."""
    code = (f"import typer; from {module} import register; "
            "app = typer.Typer(); register(app); app()")
    wired = run([str(BIN / "layerwise"), "--help"], os.environ.copy(), 60).stdout
    marker = {"cli.schedule": "schedule", "cli.registry": "models"}[module]
    if re.search(rf"^\W*{marker}\b", wired, re.M):
        return (str(BIN / "layerwise"),)
    return (sys.executable, "-c", code)

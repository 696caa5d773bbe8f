"""docs/service.md's PostgreSQL-backed Prefect and MLflow servers without Docker: the four
lines of its block run as written, with only database names, ports and the artifact folder
replaced, against the local PostgreSQL (fresh databases, dropped afterwards)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from server_stack import (BIN, PG, ROOT, Process, base_env, free_port, http_status,  # noqa: F401
                          postgres, stop_all)

pytestmark = pytest.mark.integration
URL = re.compile(r"(postgresql\+\w+://)([^@/\s]+)@([^/\s]+)/(\w+)")


def documented_lines() -> list[str]:
    text = (ROOT / "docs" / "service.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S)
                if "mlflow server" in b and "createdb" in b]
    return [ln.strip() for ln in block.strip().splitlines()]


def substitute(args: list[str], databases: dict[str, str], **options: str) -> list[str]:
    """The documented words with each database URL pointed at a fresh database on the
    local server and each named option's value replaced (it must be there)."""
    out = [URL.sub(lambda m: f"{m[1]}{PG['user']}@{PG['host']}:{PG['port']}/"
                             f"{databases[m[4]]}", a) for a in args]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        assert flag in out, f"{flag} not in the documented command {args}"
        out[out.index(flag) + 1] = value
    return out


def test_documented_native_servers_run_on_postgresql(postgres, tmp_path):
    import psycopg2
    from mlflow.tracking import MlflowClient

    lines = documented_lines()
    created = [shlex.split(ln)[-1] for ln in lines if ln.startswith("createdb ")]
    prefect_line, mlflow_line = ([shlex.split(ln) for ln in lines if " server " in ln])
    urls = {m[4] for ln in lines for m in URL.finditer(ln)}
    assert sorted(created) == sorted(urls) == ["mlflow", "prefect"]  # the URLs' databases
    assert "--serve-artifacts" in mlflow_line
    databases = {name: postgres(name) for name in created}

    env = base_env(tmp_path)
    assignments = [w for w in prefect_line if re.fullmatch(r"[A-Z_]+=\S+", w)]
    prefect_args = prefect_line[len(assignments):]
    prefect_env = {**env, **dict(substitute([a], databases)[0].split("=", 1)
                                 for a in assignments)}
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_args = substitute(prefect_args, databases, host="127.0.0.1",
                              port=str(prefect_port))
    prefect_args[0] = str(BIN / Path(prefect_args[0]).name)
    artifacts = tmp_path / "artifacts"
    mlflow_args = substitute(mlflow_line, databases, host="127.0.0.1", port=str(mlflow_port),
                             artifacts_destination=str(artifacts))
    mlflow_args[0] = str(BIN / Path(mlflow_args[0]).name)
    servers = [Process("prefect server", prefect_args, prefect_env, tmp_path / "prefect.log",
                       cwd=tmp_path),
               Process("mlflow server", mlflow_args, env, tmp_path / "mlflow.log",
                       cwd=tmp_path)]
    try:
        api, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
        servers[0].wait_for(lambda: http_status(f"{api}/health") == 200, 180, "/api/health")
        servers[1].wait_for(lambda: http_status(f"{mlflow_url}/health") == 200, 180, "/health")

        client = MlflowClient(mlflow_url)
        run = client.create_run(client.create_experiment("native"))
        client.log_metric(run.info.run_id, "test/error", 0.25)
        note = tmp_path / "note.txt"
        note.write_text("through the proxy")
        client.log_artifact(run.info.run_id, str(note))
        assert [p.read_text() for p in artifacts.rglob("note.txt")] == ["through the proxy"]

        def query(database: str, sql: str) -> list[tuple]:
            with psycopg2.connect(**{**PG, "dbname": database}) as conn, conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()

        assert query(databases["mlflow"], "SELECT key, value FROM metrics") == [
            ("test/error", 0.25)]
        tables = {t for (t,) in query(databases["prefect"], "SELECT tablename FROM "
                                      "pg_tables WHERE schemaname = 'public'")}
        assert {"flow_run", "deployment", "work_pool"} <= tables
    finally:
        stop_all(servers)

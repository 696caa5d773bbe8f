"""The compose stack's servers, natively: the very commands docker-compose.yml runs (parsed
out of it, with only hosts, ports, paths and database names substituted) against this
machine's PostgreSQL, then the pipeline against them the ways a team uses it:

- ``layerwise run`` pointed at both servers;
- ``layerwise schedule serve`` (a served, scheduled deployment) triggered through the API,
  and ``layerwise schedule list``;
- prefect.yaml registered by the compose ``deployments`` command and run by the compose
  worker command;
- the MLflow server's basic-auth switch.

Needs PostgreSQL on 127.0.0.1:5432 where user ``postgres`` may create databases (override
with LAYERWISE_TEST_PG_HOST / _PORT / _USER / _DB) and the shared MNIST. Every database it
creates has a random name and is dropped at the end; every process it starts is stopped.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from server_stack import (BIN, ROOT, STAGES, TINY, Process, argv, auth_ini, base_env,  # noqa: F401
                          client_env, compose, compose_env, free_port, http_status,
                          local_db_url, mlflow_client, native, postgres, prefect_api,
                          python_cli, run, stack, stop_all)  # postgres: a fixture of stack

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- background processes

def documented_worker_commands() -> tuple[set[str], list[str], list[str]]:
    """docs/service.md's block that registers prefect.yaml and starts a worker: the names
    it exports, the `make deploy` command and the worker command."""
    text = (ROOT / "docs" / "service.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "make deploy" in b]
    lines = [ln.split("#", 1)[0].strip() for ln in block.strip().splitlines()]
    (export,) = [ln for ln in lines if ln.startswith("export ")]
    (deploy,) = [ln.split() for ln in lines if ln.startswith("make ")]
    (worker,) = [ln.split() for ln in lines if " worker start " in ln]
    return {item.split("=", 1)[0] for item in export.split()[1:]}, deploy, worker


def flow_run_logs(stack: dict[str, Any], flow_run_id: Any) -> str:
    """The flow run's log lines as the Prefect UI shows them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_api(stack) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def assert_stage_lines_and_link(stack: dict[str, Any], flow_run_id: Any, run_id: str) -> None:
    """Each stage's line with its seconds, and the MLflow run's UI link, in the flow run's
    logs. A finished run's process sends its last lines as it exits: wait for them."""
    link = re.compile(rf"MLflow run: {re.escape(stack['mlflow'])}/#/experiments/\d+/runs/"
                      f"{run_id}")
    deadline, logs = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        logs = flow_run_logs(stack, flow_run_id)
        missing = [s for s in STAGES if not re.search(rf"^done  {s} +\d+\.\d s", logs, re.M)]
        if not missing and link.search(logs):
            return
        time.sleep(1)
    pytest.fail(f"stage lines {missing} or the MLflow link missing from the logs:\n{logs}")


@pytest.fixture(scope="module")
def background(stack) -> Iterator[dict[str, Any]]:
    """Started before the ``layerwise run`` below, so that their start-up overlaps its
    training: ``layerwise schedule serve --verbose`` of the tiny config and ``make deploy``
    (creates the work pool, ``prefect deploy --all``), as docs/service.md starts them; the
    worker is started after ``make deploy`` (``start_worker``)."""
    name = f"nightly-{secrets.token_hex(3)}"
    sets = [a for s in TINY for a in ("--set", s)]
    env = client_env(stack)
    serve = Process("schedule serve", [
        *python_cli("cli.schedule"), "schedule", "serve", "--cron", "0 3 * * *",
        "--name", name, "--preset", "quick", *sets, "--data-dir", str(stack["data"]),
        "--tracking-uri", stack["mlflow"], "--experiment", "scheduled", "--verbose"],
        env, stack["tmp"] / "serve.log")
    # docs/service.md's worker from a checkout: `make deploy` (the data root given, as the
    # docs say to for an offline machine), then the worker with PREFECT_API_URL only, in
    # another directory.
    exports, make_deploy, worker_cmd = documented_worker_commands()
    assert exports == {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"}
    venv = Path(sys.executable).parent.parent
    deploy = Process("make deploy", [
        "make", "-o", str(venv / ".installed"), *make_deploy[1:], f"VENV={venv}"],
        {**env, "MLFLOW_TRACKING_URI": stack["mlflow"], "LAYERWISE_DATA_DIR": str(stack["data"])},
        stack["tmp"] / "deploy.log")  # -o: never reinstall the shared environment
    worker_cmd[0] = str(BIN / Path(worker_cmd[0]).name)
    workers: list[Process] = []

    def start_worker() -> Process:  # after make deploy: a worker creates a missing pool too
        workers.append(Process("worker", worker_cmd, {**base_env(stack["tmp"]),
                                                      "PREFECT_API_URL": stack["api"]},
                               stack["tmp"] / "worker.log", cwd=stack["tmp"]))
        return workers[-1]

    # The MLflow service again, with MLFLOW_AUTH_ARGS="--app-name basic-auth", on the
    # (already migrated) backend database of the running one.
    auth_port = free_port()
    auth_env = compose_env(MLFLOW_PORT=str(auth_port), MLFLOW_AUTH_ARGS="--app-name basic-auth")
    svc = compose(auth_env)["services"]["mlflow"]
    cmd = argv(svc["command"])
    auth_tmp = stack["tmp"] / "auth"
    auth_tmp.mkdir()
    auth = Process("mlflow basic-auth", native(
        cmd, host="127.0.0.1", port=str(auth_port),
        artifacts_destination=str(auth_tmp / "artifacts"),
        backend_store_uri=local_db_url(cmd[cmd.index("--backend-store-uri") + 1],
                                       stack["mlflow_db"])),
        {**base_env(auth_tmp), **svc["environment"],
         "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini(auth_tmp))},
        auth_tmp / "auth.log", cwd=auth_tmp)
    try:
        yield {"serve": serve, "name": name, "deploy": deploy, "start_worker": start_worker,
               "auth": auth,
               "auth_url": f"http://127.0.0.1:{auth_port}", "auth_env": auth_env,
               "auth_args": cmd}
    finally:
        stop_all([*workers, deploy, serve, auth])


# ---------------------------------------------------------------- layerwise run

@pytest.fixture(scope="module")
def cli_run(stack, background) -> dict[str, Any]:
    """``layerwise run`` with a tiny config against both servers."""
    sets = [a for s in TINY for a in ("--set", s)]
    result = run([str(BIN / "layerwise"), "run", "--preset", "quick", *sets,
                  "--data-dir", str(stack["data"]), "--tracking-uri", stack["mlflow"],
                  "--experiment", "servers", "--model-name", "servers-classifier"],
                 client_env(stack), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", result.stdout).group(1)
    version = re.search(r"model servers-classifier v(\d+)", result.stdout).group(1)
    return {"run_id": run_id, "version": version, "stdout": result.stdout,
            "stderr": result.stderr}


def test_cli_run_is_recorded_in_the_mlflow_server(stack, cli_run):
    client = mlflow_client(stack)
    parent = client.get_run(cli_run["run_id"])
    assert parent.data.tags["layerwise.kind"] == "pipeline"
    assert parent.info.status == "FINISHED"
    assert 0 <= parent.data.metrics["test/error_pretrained"] <= 1
    assert parent.data.params["model.hidden_sizes"] == "[32, 16]"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "servers"
    # Artifacts go through the server's proxy, into its --artifacts-destination.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{cli_run['run_id']}'")
    by_stage = {r.data.tags["layerwise.stage"]: r for r in children}
    assert set(by_stage) == STAGES
    assert {r.info.status for r in children} == {"FINISHED"}
    evaluate = by_stage["evaluate"].info.run_id
    listed = {f.path for f in client.list_artifacts(evaluate, "evaluation")}
    assert "evaluation/confusion_pretrained.csv" in listed and len(listed) >= 5
    on_disk = {p.name for p in stack["artifacts"].rglob("*") if p.is_file()}
    assert {"confusion_pretrained.csv", "filters_layer_1.png", "dae.safetensors"} <= on_disk


def test_registered_model_loads_through_the_artifact_proxy(stack, cli_run, tmp_path):
    import mlflow
    import mlflow.pytorch
    import torch

    client = mlflow_client(stack)
    version = client.get_model_version("servers-classifier", cli_run["version"])
    assert version.tags["layerwise.run_id"] == cli_run["run_id"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(stack["mlflow"])
    try:
        model = mlflow.pytorch.load_model(f"models:/servers-classifier/{cli_run['version']}",
                                          dst_path=str(tmp_path))
    finally:
        mlflow.set_tracking_uri(previous)
    assert any(tmp_path.rglob("MLmodel"))  # downloaded, not read from a shared disk
    with torch.no_grad():
        assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_flow_and_task_runs_are_in_the_prefect_server(stack, cli_run):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with prefect_api(stack) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["layerwise-pipeline"])))
        (flow_run,) = [r for r in runs if r.parameters.get("experiment") == "servers"]
        assert flow_run.state.is_completed()
        assert flow_run.parameters["preset"] == "quick"
        task_names = {t.name for t in client.read_task_runs() if t.flow_run_id == flow_run.id}
    # the twins fine-tune as one task; each arm keeps its own MLflow run
    assert STAGES - {"finetune-pretrained", "finetune-random"} | {"finetune-twins"} <= task_names
    assert_stage_lines_and_link(stack, flow_run.id, cli_run["run_id"])


#: Lines of Lightning, MLflow and Prefect that the console shows only with --verbose.
CHATTER = re.compile(r"GPU available|TPU available|Tip:|Trainer.fit. stopped|View run|"
                     r"View experiment|Successfully registered|Created version|"
                     r"INFO mlflow|\| INFO ")


def test_console_is_one_line_per_stage_plus_the_result(cli_run):
    """A server run printed ~50 lines, a third of them the libraries' chatter; quiet by
    default (--verbose brings it back: the served run of `schedule serve --verbose`, in
    test_schedule_serve_runs_the_deployment_and_lists_it)."""
    lines = cli_run["stdout"].splitlines()
    stage_lines = [ln for ln in lines if ln.startswith("  done  ")]
    assert sorted(ln.split()[1] for ln in stage_lines) == sorted(STAGES)
    assert not CHATTER.search(cli_run["stdout"] + cli_run["stderr"]), \
        cli_run["stdout"] + cli_run["stderr"]
    assert cli_run["stderr"].strip() == "", cli_run["stderr"]
    assert len([ln for ln in lines if ln.strip()]) <= len(STAGES) + 7, lines


def test_registry_cli_reads_the_servers_runs_and_models(stack, cli_run):
    cli, env = python_cli("cli.registry"), client_env(stack)
    uri = ["--tracking-uri", stack["mlflow"]]
    out = run([*cli, "runs", "--experiment", "servers", "--format", "json", *uri], env, 120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert cli_run["run_id"] in out.stdout
    out = run([*cli, "show", cli_run["run_id"], *uri], env, 120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test/error_pretrained" in out.stdout and "evaluate" in out.stdout
    # a stage's child run: its artifacts, in subdirectories, through the artifact proxy
    (evaluate,) = mlflow_client(stack).search_runs(
        [mlflow_client(stack).get_run(cli_run["run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{cli_run['run_id']}' and tags.`layerwise.stage` = "
        "'evaluate'")
    out = run([*cli, "show", evaluate.info.run_id, *uri], env, 120)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = out.stdout.split("\nartifacts:", 1)[1]
    assert "evaluation/confusion_pretrained.csv" in listed and "MLmodel" in listed, out.stdout
    out = run([*cli, "models", "--name", "servers-classifier", "--format", "json", *uri],
              env, 120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert cli_run["run_id"] in out.stdout or f'"{cli_run["version"]}"' in out.stdout


# ---------------------------------------------------------------- layerwise schedule

def test_schedule_serve_rejects_a_bad_config_before_registering(stack):
    name = f"bad-{secrets.token_hex(3)}"
    result = run([*python_cli("cli.schedule"), "schedule", "serve", "--cron", "0 3 * * *",
                  "--name", name, "--set", "pretrain.epochs=0"], client_env(stack), 120)
    assert result.returncode == 2
    assert "pretrain.epochs = 0" in result.stderr
    with prefect_api(stack) as client:
        assert name not in {d.name for d in client.read_deployments()}


def _next_3am(now: datetime) -> datetime:
    today = now.replace(hour=3, minute=0, second=0, microsecond=0)
    return today if today > now else today + timedelta(days=1)


def test_schedule_serve_runs_the_deployment_and_lists_it(stack, background, cli_run):
    """...and SIGTERM to `serve` while a run is in progress ends that run: Prefect
    CANCELLED or CRASHED, MLflow KILLED."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    serve, name = background["serve"], background["name"]
    try:
        with prefect_api(stack) as client:
            def registered():
                return any(d.name == name for d in client.read_deployments())

            serve.wait_for(registered, 120, "a registered deployment")
            (deployment,) = [d for d in client.read_deployments() if d.name == name]
        params = deployment.parameters
        assert params["preset"] == "quick" and params["config"]["model"]["hidden_sizes"] == [32, 16]
        assert params["config"]["data"]["data_dir"] == str(stack["data"])

        with temporary_settings(updates={PREFECT_API_URL: stack["api"]}):
            flow_run = run_deployment(f"layerwise-pipeline/{name}", timeout=300,
                                      poll_interval=1)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{serve.tail()}"

        client = mlflow_client(stack)
        experiment = client.get_experiment_by_name("scheduled")
        (parent,) = client.search_runs([experiment.experiment_id],
                                       "tags.`layerwise.kind` = 'pipeline'")
        assert parent.info.status == "FINISHED" and parent.data.params["preset"] == "quick"
        assert_stage_lines_and_link(stack, flow_run.id, parent.info.run_id)
        chatter = serve.tail(10 ** 6)  # served with --verbose (its stages come from cache:
        assert "View run" in chatter and "Created version" in chatter, chatter[-3000:]  # no fit)

        # The server's scheduler turns the cron schedule into scheduled runs within seconds.
        listed: dict[str, Any] = {}

        def scheduled():
            out = run([*python_cli("cli.schedule"), "schedule", "list", "--json"],
                      client_env(stack), 120)
            assert out.returncode == 0, out.stderr[-2000:]
            rows = {r["name"]: r for r in json.loads(out.stdout)}
            listed.update(rows.get(f"layerwise-pipeline/{name}", {}))
            return listed.get("next_run_source") == "scheduled"

        serve.wait_for(scheduled, 60, "scheduled next run in `schedule list` (the Prefect "
                       f"server's scheduler creates them: see {stack['tmp']}/prefect.log)")
        assert listed["schedules"] == ["cron 0 3 * * * (UTC)"]
        assert listed["runs_on"] == "served" and listed["preset"] == "quick"
        assert datetime.fromisoformat(listed["next_run"]) == _next_3am(datetime.now(timezone.utc))
        table = run([*python_cli("cli.schedule"), "schedule", "list"], client_env(stack), 120)
        assert re.search(rf"layerwise-pipeline/{name}\s+quick\s+cron 0 3 \* \* \* \(UTC\)",
                         table.stdout), table.stdout
        killed = _sigterm_during_a_served_run(stack, serve, deployment.id)
    finally:
        serve.stop()
    with prefect_api(stack) as client:  # SIGTERM paused the schedule on the way out
        (deployment,) = [d for d in client.read_deployments() if d.name == name]
        assert deployment.paused
        (after,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[killed.id])))
    # the run in progress ended, in both stores
    assert after.state.type.value in ("CANCELLED", "CRASHED"), (after.state, serve.tail())
    experiment = mlflow_client(stack).get_experiment_by_name("sigterm")
    statuses = {r.info.run_name: r.info.status
                for r in mlflow_client(stack).search_runs([experiment.experiment_id])}
    assert statuses[after.name] == "KILLED" and statuses["pretrain-layer-1"] == "KILLED"
    assert set(statuses.values()) <= {"KILLED", "FINISHED"}, statuses


def _sigterm_during_a_served_run(stack: dict[str, Any], serve: Process, deployment_id: Any
                                 ) -> Any:
    """Trigger a run of the served deployment that trains for a while; once its first
    layer trains, SIGTERM to `schedule serve` alone (as `kill PID` does, not its group).
    Prefect 3.8.8's own handler left that run RUNNING in both stores."""
    slow = ["data.n_train=2000", "model.hidden_sizes=[64,32]", "pretrain.epochs=30",
            "finetune.max_epochs=1", f"data.data_dir={stack['data']}"]
    with prefect_api(stack) as client:
        flow_run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"config": None, "overrides": slow,
                                       "experiment": "sigterm"})
    mlflow = mlflow_client(stack)

    def training() -> bool:
        experiment = mlflow.get_experiment_by_name("sigterm")
        return experiment is not None and any(
            r.data.tags.get("layerwise.stage") == "pretrain-layer-1"
            for r in mlflow.search_runs([experiment.experiment_id]))

    serve.wait_for(training, 180, "the served run's first pretraining stage")
    os.kill(serve.proc.pid, signal.SIGTERM)
    serve.proc.wait(90)
    return flow_run


# ---------------------------------------------------------------- prefect.yaml + worker

def test_make_deploy_on_a_fresh_server_and_a_worker_that_needs_only_the_api_url(
        stack, background, cli_run):
    """docs/service.md's commands: `make deploy` on a fresh server (no work pool yet)
    registers prefect.yaml with the flow runs' environment; a worker started with
    PREFECT_API_URL alone, in another directory, runs it offline into the MLflow server,
    with the stage lines and the MLflow link in the flow run's Prefect logs."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deploy = background["deploy"]
    deploy.wait_for(lambda: deploy.proc.poll() is not None, 300, "the end of make deploy")
    assert deploy.proc.returncode == 0, deploy.tail()
    assert "Created work pool 'layerwise'" in deploy.tail(20000), deploy.tail()  # none before
    with prefect_api(stack) as client:
        deployment = client.read_deployment_by_name("layerwise-pipeline/nightly")
        pool = client.read_work_pool("layerwise")
    assert pool.type == "process"
    assert deployment.work_pool_name == "layerwise"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters["preset"] == "default"
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": str(ROOT)}}]  # filled in by make deploy
    env = deployment.job_variables["env"]
    # LAYERWISE_HOME is the shell's (client_env), the rest make's defaults and the exports
    assert env == {"LAYERWISE_APP_DIR": str(ROOT), "LAYERWISE_HOME": str(stack["home"]),
                   "LAYERWISE_DATA_DIR": str(stack["data"]),
                   "MLFLOW_TRACKING_URI": stack["mlflow"],
                   "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                   "PREFECT_LOCAL_STORAGE_PATH": f"{stack['home']}/prefect-results",
                   "PYTHONPYCACHEPREFIX": f"{stack['home']}/pycache"}

    worker = background["start_worker"]()
    try:
        # preset + overrides, as `layerwise run --preset quick --set ...`
        with temporary_settings(updates={PREFECT_API_URL: stack["api"]}):
            flow_run = run_deployment(
                "layerwise-pipeline/nightly", timeout=300, poll_interval=1,
                parameters={"preset": "quick", "overrides": TINY, "experiment": "worker"})
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{worker.tail()}"
        client = mlflow_client(stack)
        experiment = client.get_experiment_by_name("worker")
        (parent,) = client.search_runs([experiment.experiment_id],
                                       "tags.`layerwise.kind` = 'pipeline'")
        # before stopping the worker: its flow run's process sends its last lines on exit
        assert_stage_lines_and_link(stack, flow_run.id, parent.info.run_id)
    finally:
        worker.stop()
    assert parent.info.status == "FINISHED" and parent.data.params["preset"] == "quick"
    assert json.loads(parent.data.params["overrides"]) == TINY
    assert parent.data.params["pretrain.epochs"] == "1"
    assert parent.data.params["data.data_dir"] == str(stack["data"])  # offline: no download
    assert parent.info.run_name == flow_run.name and parent.info.run_name.startswith(
        "quick-s0-")  # the same name in both UIs


def test_schedule_serve_refuses_to_take_over_a_work_pool_deployment(stack, background):
    """`schedule serve --name nightly` would have overwritten prefect.yaml's deployment."""
    deploy = background["deploy"]
    deploy.wait_for(lambda: deploy.proc.poll() is not None, 300, "the end of prefect deploy")
    with prefect_api(stack) as client:
        before = client.read_deployment_by_name("layerwise-pipeline/nightly")
    result = run([*python_cli("cli.schedule"), "schedule", "serve", "--name", "nightly",
                  "--preset", "quick"], client_env(stack), 120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "layerwise-pipeline/nightly already exists and runs on work pool 'layerwise'" in \
        result.stderr and "--replace" in result.stderr and "Traceback" not in result.stderr
    with prefect_api(stack) as client:
        after = client.read_deployment_by_name("layerwise-pipeline/nightly")
    assert (after.updated, after.parameters, after.entrypoint, after.paused) == (
        before.updated, before.parameters, before.entrypoint, before.paused)


# ---------------------------------------------------------------- MLflow basic auth

def test_mlflow_basic_auth_switch_requires_logins(background):
    """MLFLOW_AUTH_ARGS="--app-name basic-auth": the same command, now with logins."""
    assert background["auth_args"][-2:] == ["--app-name", "basic-auth"]
    base, server, env = background["auth_url"], background["auth"], background["auth_env"]
    server.wait_for(lambda: http_status(f"{base}/health") == 200, 180, "a healthy /health")
    api = f"{base}/api/2.0/mlflow/experiments/search?max_results=5"
    admin = (env["MLFLOW_ADMIN_USERNAME"], env["MLFLOW_ADMIN_PASSWORD"])
    # Password checks hash with PBKDF2: seconds each on a busy machine.
    assert http_status(api, timeout=60) == 401
    assert http_status(api, (admin[0], "wrong-password"), timeout=60) == 401
    assert http_status(api, admin, timeout=60) == 200


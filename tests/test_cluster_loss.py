"""Losing a machine of a Dask cluster in the middle of an ablation cell.

The cluster is started as docs/ablation.md ("On a Dask cluster") tells its user: a
``dask scheduler`` and two ``dask worker`` processes, each from a directory of its own with
only the variables that section exports (the Prefect and MLflow servers of
``tests/server_stack.py`` on PostgreSQL, one shared ``LAYERWISE_HOME``, the data folder,
the checkout). ``layerwise ablate --dask-address`` runs a two-cell grid there; once the
pretrained cell has an epoch checkpoint and is still training, the worker running it is
SIGKILLed with its nanny (the machine is gone; with it, usually, the layer the cell reads,
held in that worker's memory). The cell goes on on the other worker from that checkpoint,
the ablation exits 0, its table is the same grid's run in process (no Dask), and no run is
left RUNNING in MLflow.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from server_stack import (BIN, ROOT, Process, free_port, postgres, prefect_api,  # noqa: F401
                          stack, stop_all)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: One seed, both arms: the random cell fine-tunes while layer 1 pretrains, then the
#: pretrained cell on the worker that holds layer 1. Fine-tuning epochs of ~2-3 s on a busy
#: 2-core machine, a checkpoint inside an epoch every second.
GRID = """\
name: cluster-loss
base:
  preset: quick
  overrides:
    data: {n_train: 10000}
    model: {hidden_sizes: [512]}
    pretrain: {epochs: 1, corruption_levels: [0.2]}
    finetune: {max_epochs: 10, early_stopping: none}
    runtime: {checkpoint_seconds: 1.0}
factors:
  depth: [1]
  init: [pretrained, tutorial]
  seeds: [0]
"""
CELLS = {"pretrained": "depth=1,init=pretrained,seed=0", "random": "depth=1,init=tutorial,seed=0"}
OUTCOME = ["cell", "status", "test_error", "val_error", "train_loss", "epochs_run"]


def documented_cluster() -> tuple[list[str], list[str], list[str], list[str]]:
    """docs/ablation.md's cluster block: the names it exports, the scheduler, worker and
    ablate commands (split, with their placeholders)."""
    text = (ROOT / "docs" / "ablation.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "dask worker" in b]
    lines = [ln.split("#", 1)[0].strip() for ln in block.strip().splitlines()]
    names = [ln.split()[1].split("=")[0] for ln in lines if ln.startswith("export ")]
    (scheduler,) = [shlex.split(ln) for ln in lines if ln.startswith("dask scheduler")]
    (worker,) = [shlex.split(ln) for ln in lines if ln.startswith("dask worker")]
    (ablate,) = [shlex.split(ln) for ln in lines if ln.startswith("layerwise ablate")]
    return names, scheduler, worker, ablate


def machine_env(names: list[str], values: dict[str, str], home: Path) -> dict[str, str]:
    """What a fresh login on a machine of the cluster has: a PATH, a home of its own, and
    the documented variables; nothing of this test process's environment."""
    assert set(names) == set(values), (names, sorted(values))
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           **{name: values[name] for name in names}}
    if "PYTHONPYCACHEPREFIX" in os.environ:  # where the interpreter caches bytecode only
        env["PYTHONPYCACHEPREFIX"] = os.environ["PYTHONPYCACHEPREFIX"]
    return env


def checkpoints(home: Path) -> dict[str, tuple[int, int]]:
    """Each fine-tuning stage's newest epoch checkpoint in ``home``, by arm:
    (epochs done, chunks done of the next)."""
    from safetensors import safe_open

    newest: dict[str, tuple[int, int]] = {}
    for path in home.glob("stages/finetune-*/resume/epoch-*.safetensors"):
        arm = path.parents[1].name.split("-")[1]
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads(fh.metadata()["meta"])
        except Exception:  # noqa: BLE001 - replaced while read: the next poll sees it
            continue
        newest[arm] = max(newest.get(arm, (0, 0)), (meta["epoch"], meta.get("position", 0)))
    return newest


def cells_on_each_worker(client: Any) -> dict[str, list[str]]:
    """The ids of the cells each worker is executing, read from the tasks' specs there."""
    ids = list(CELLS.values())

    def executing(dask_worker: Any) -> list[str]:  # defined here: sent by value
        from distributed.protocol.pickle import dumps

        specs = [dumps(ts.run_spec) for ts in dask_worker.state.tasks.values()
                 if ts.state == "executing"]
        return [cell for cell in ids if any(cell.encode() in spec for spec in specs)]

    return client.run(executing)


def live_epochs(uri: str, experiment: str, cell: str) -> list[int]:
    """The epochs of ``cell``'s fine-tuning that its MLflow run holds, in order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{cell}'") if exp else []
    if not runs:
        return []
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id,
                                                            "finetune/train_loss"))


def outcome(out: Path) -> list[dict[str, Any]]:
    import pandas as pd

    return pd.read_csv(out / "cells.csv")[OUTCOME].to_dict("records")


def printed(log: Path) -> list[str]:
    """The cell lines and the summary table as printed (the timing-free part)."""
    lines = log.read_text(errors="replace").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("[1/"))
    end = next(i for i, ln in enumerate(lines) if " cells finished," in ln)
    return [ln.rstrip() for ln in lines[start:end + 1]]


def test_a_worker_lost_mid_cell_is_continued_from_its_checkpoint(stack, tmp_path):  # noqa: F811
    from distributed import Client
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, TaskRunFilter,
                                                TaskRunFilterFlowRunId)

    names, scheduler_cmd, worker_cmd, ablate_cmd = documented_cluster()
    shared = tmp_path / "shared"
    grid = shared / "grid.yaml"
    grid.parent.mkdir()
    grid.write_text(GRID)
    values = {"PREFECT_API_URL": stack["api"], "MLFLOW_TRACKING_URI": stack["mlflow"],
              "LAYERWISE_HOME": str(shared / "layerwise"),
              "LAYERWISE_DATA_DIR": str(stack["data"]), "PYTHONPATH": str(ROOT)}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    machines = {m: tmp_path / m for m in ("scheduler", "worker-0", "worker-1", "client",
                                          "reference")}
    for folder in machines.values():
        folder.mkdir()

    def on(machine: str, args: list[str], env_values: dict[str, str] = values) -> Process:
        cwd = machines[machine] / "cwd"
        cwd.mkdir()
        return Process(machine, args, machine_env(names, env_values, machines[machine]),
                       machines[machine] / "log", cwd=cwd)

    def ablate(machine: str, *extra: str) -> list[str]:
        args = [str(BIN / "layerwise"), *ablate_cmd[1:]]
        args[args.index("--preset"):args.index("--preset") + 2] = ["--grid", str(grid)]
        if "--dask-address" in args:
            i = args.index("--dask-address")
            del args[i:i + 2]
        return [*args, "--out", str(machines[machine] / "out"), "--experiment", machine, *extra]

    started: list[Process] = []
    client = None
    try:
        assert scheduler_cmd[2:] == ["--port", "8786"], scheduler_cmd
        started.append(on("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                        "--port", str(port), "--no-dashboard"]))
        assert worker_cmd[2] == "tcp://SCHEDULER_HOST:8786", worker_cmd
        workers = [on(f"worker-{i}", [str(BIN / "dask"), "worker", address, *worker_cmd[3:],
                                      "--name", f"worker-{i}", "--no-dashboard",
                                      "--local-directory", str(machines[f"worker-{i}"])])
                   for i in range(2)]
        started += workers
        client = Client(address, timeout=120)
        started[0].wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 120,
                            "two workers registered")
        # The same grid in process, into its own LAYERWISE_HOME, while the cluster works.
        reference = on("reference", ablate("reference"),
                       {**values, "LAYERWISE_HOME": str(machines["reference"] / "home")})
        started.append(reference)
        cluster_run = on("client", ablate("client", "--dask-address", address))
        started.append(cluster_run)

        home = shared / "layerwise"
        arm = "pretrained"  # its worker also holds layer 1, which the cell reads
        # Watched in MLflow: the cell's run, open since the start, gets each epoch as it
        # ends, from the worker that trains it.
        cluster_run.wait_for(lambda: checkpoints(home).get(arm, (0, 0))[0] >= 1
                             and live_epochs(stack["mlflow"], "client", CELLS[arm]), 300,
                             "the pretrained cell's first epoch, checkpointed and in MLflow")
        before = checkpoints(home)
        running = cells_on_each_worker(client)
        (victim,) = [addr for addr, cells in running.items() if CELLS[arm] in cells]
        pid = client.run(os.getpid, workers=[victim])[victim]
        (lost,) = [w for w in workers if os.getpgid(pid) == w.proc.pid]  # worker + nanny
        lost.signal(signal.SIGKILL)
        lost.proc.wait(30)
        killed_at = checkpoints(home)[arm]
        assert killed_at >= before[arm] and killed_at[0] >= 1

        # After the kill: the cell's checkpoints go on from where they were, never again
        # from the start, until the stage ends and removes them.
        after: list[tuple[int, int]] = []
        deadline = time.monotonic() + 420
        while cluster_run.proc.poll() is None and time.monotonic() < deadline:
            now = checkpoints(home).get(arm)
            if now is not None and (not after or now != after[-1]):
                after.append(now)
            time.sleep(0.1)
        assert cluster_run.proc.wait(max(1, deadline - time.monotonic())) == 0, \
            cluster_run.tail(8000) + "\n" + lost.tail(3000)
        assert reference.proc.wait(300) == 0, reference.tail(8000)
        survivor = next(w for w in workers if w is not lost)
        assert survivor.proc.poll() is None, survivor.tail()
        assert after and min(after) >= killed_at and max(after) > killed_at, (killed_at, after)
        assert not list(home.glob("stages/*/resume/epoch-*"))  # removed once finished
    finally:
        if client is not None:
            client.close()
        stop_all(started)

    log = cluster_run.log.read_text(errors="replace")
    assert "2 of 2 cells finished, 0 diverged, 0 failed." in log, log[-4000:]
    assert outcome(machines["client"] / "out") == outcome(machines["reference"] / "out")
    assert printed(cluster_run.log) == printed(reference.log)

    with prefect_api(stack) as api:
        (flow_run,) = [r for r in api.read_flow_runs(flow_filter=FlowFilter(
            name=FlowFilterName(any_=["layerwise-ablation"]))) if
            r.parameters.get("experiment") == "client"]
        task_runs = api.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.state.is_completed(), flow_run.state
    # The tasks the flow submitted (each cell and layer) completed, the lost ones on the
    # other worker. (The fine-tuning task run that the lost worker had started inside its
    # cell stays RUNNING in Prefect: nothing reports a lost worker's own task runs.)
    submitted = {t.name: t.state.type.value for t in task_runs
                 if t.name.startswith(("cell/", "layer-"))}
    layers = [name for name in submitted if name.startswith("layer-1/")]
    assert len(layers) == 1, submitted
    assert set(submitted) - set(layers) == {f"cell/{cell}" for cell in CELLS.values()}, submitted
    assert set(submitted.values()) == {"COMPLETED"}, submitted

    mlflow = MlflowClient(stack["mlflow"])
    for experiment in ("client", "reference"):
        exp = mlflow.get_experiment_by_name(experiment)
        runs = mlflow.search_runs([exp.experiment_id])  # the parent, 2 cells, 1 layer
        assert len(runs) == 4, [(r.info.run_name, r.info.status) for r in runs]
        assert {r.info.status for r in runs} == {"FINISHED"}, [
            (r.info.run_name, r.info.status) for r in runs]
        resumed = {r.info.run_name: int(r.data.tags.get("layerwise.resumed_from_epoch", 0))
                   for r in runs if r.info.run_name in CELLS.values()}
        if experiment == "client":  # the lost cell says where it went on from
            assert resumed[CELLS["pretrained"]] >= 1, resumed
        else:
            assert set(resumed.values()) == {0}, resumed
        for run in runs:  # every epoch once, the lost cell's included
            if run.info.run_name in CELLS.values():
                epochs = int(run.data.metrics["finetune/epochs_run"])
                assert live_epochs(stack["mlflow"], experiment, run.info.run_name) == list(
                    range(epochs)), run.info.run_name

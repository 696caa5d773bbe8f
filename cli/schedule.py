"""Scheduled pipeline runs: ``layerwise schedule serve`` and ``layerwise schedule list``.

``serve`` is one long-lived process that registers a deployment of a flow with a Prefect
server (cron and/or interval schedules, the validated config as its parameters) and runs
each of its flow runs in a subprocess, on this machine. It needs a persistent Prefect server
(``PREFECT_API_URL``): the ephemeral API that ``layerwise run`` starts has no scheduler.
For a stack with a work pool and a worker instead, see ``prefect.yaml`` and
``docker-compose.yml``.

Prefect is imported inside the commands (settings are read at import, and ``layerwise
--help`` stays fast); only typer is imported here.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import typer

from cli.common import fail
from cli.options import (ConfigArgs, ExperimentOpt, ModelNameOpt, TrackingUriOpt,
                         VerboseOpt, config_options, model_name_for)

# name -> (module, flow object): the flows ``serve --flow`` accepts; a flow added here also
# needs its own branch in ``flow_parameters``.
FLOWS: dict[str, tuple[str, str]] = {
    "pipeline": ("flows.pipeline", "pipeline"),
}
DEFAULT_DEPLOYMENT = "scheduled"


class ScheduleError(ValueError):
    """A bad schedule or flow choice, caught before anything is registered."""


def flow_parameters(flow: str, config: Any, preset: str, tracking_uri: Optional[str],
                    experiment: str, model_name: str) -> dict[str, Any]:
    """The fixed parameters of a deployment: the resolved config as JSON plus the preset
    and the MLflow destination, exactly the arguments ``layerwise run`` passes the flow."""
    if flow == "pipeline":
        return {"config": config.model_dump(mode="json"), "preset": preset,
                "tracking_uri": tracking_uri, "experiment": experiment,
                "registered_model_name": model_name_for(config.objective, model_name)}
    raise ScheduleError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")


def build_schedules(cron: Optional[str], interval: Optional[float],
                    tz: Optional[str]) -> list[Any]:
    """Prefect schedules for ``--cron`` and ``--interval`` (both may be given; neither
    gives a deployment that runs only when triggered)."""
    from prefect.schedules import Cron, Interval

    schedules = []
    if cron is not None:
        try:
            schedules.append(Cron(cron, timezone=tz))
        except ValueError as exc:
            raise ScheduleError(f"--cron {cron!r}: {exc}") from None
    if interval is not None:
        if interval <= 0:
            raise ScheduleError(f"--interval {interval}: must be a positive number of seconds")
        schedules.append(Interval(timedelta(seconds=interval), timezone=tz))
    return schedules


def load_flow(name: str) -> Any:
    import importlib

    if name not in FLOWS:
        raise ScheduleError(f"unknown flow {name!r}; choose one of {', '.join(FLOWS)}")
    module, attribute = FLOWS[name]
    return getattr(importlib.import_module(module), attribute)


def require_api_url() -> str:
    """The persistent Prefect API to register with; schedules mean nothing without one."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise ScheduleError(
            "PREFECT_API_URL is not set. Start a Prefect server (`prefect server start`, or "
            "`docker compose up`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def check_takeover(flow_name: str, name: str, replace: bool) -> None:
    """Refuse to serve under the name of a deployment that runs on a work pool (e.g.
    ``prefect.yaml``'s ``nightly``): serving would overwrite its parameters, entrypoint and
    pull steps, and leave it paused on exit. ``replace`` takes it over anyway."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            existing = client.read_deployment_by_name(f"{flow_name}/{name}")
    except ObjectNotFound:
        return
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL: say so
        raise ScheduleError(f"cannot read deployments from the Prefect API ({exc}); is the "
                            "server at PREFECT_API_URL running?") from None
    if existing.work_pool_name and not replace:
        raise ScheduleError(
            f"deployment {flow_name}/{name} already exists and runs on work pool "
            f"{existing.work_pool_name!r} (prefect.yaml or `prefect deploy`); serving it "
            "here would overwrite it and pause it on exit. Choose another --name, or pass "
            "--replace to take it over")


def make_deployment(flow_name: str, name: str, parameters: dict[str, Any],
                    schedules: list[Any], limit: Optional[int]) -> Any:
    """A ``RunnerDeployment`` addressed by module path, so the flow runs it starts import
    the installed package from any working directory."""
    from prefect.deployments.runner import EntrypointType

    flow = load_flow(flow_name)
    return flow.to_deployment(
        name=name, schedules=schedules, parameters=parameters,
        concurrency_limit=limit, tags=["layerwise", f"preset:{parameters.get('preset')}"],
        description=f"layerwise {flow_name}, preset {parameters.get('preset')}, served by "
                    "`layerwise schedule serve`",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe_schedule(schedule: Any) -> str:
    """``cron 0 3 * * * (UTC)`` or ``every 3600 s``, from a client-side schedule object."""
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron} ({schedule.timezone or 'UTC'})"
    if getattr(schedule, "interval", None) is not None:
        return f"every {int(schedule.interval.total_seconds())} s"
    if getattr(schedule, "rrule", None):
        return f"rrule {schedule.rrule}"
    return str(schedule)


async def _computed_next(schedules: list[Any]) -> Optional[datetime]:
    """The next date the active schedules give, for a deployment whose runs the server has
    not created yet (its scheduler runs every few seconds)."""
    from prefect.server.schemas import schedules as server_schedules

    kinds = {"cron": server_schedules.CronSchedule,
             "interval": server_schedules.IntervalSchedule,
             "rrule": server_schedules.RRuleSchedule}
    dates = []
    for entry in schedules:
        if not entry.active:
            continue
        data = entry.schedule.model_dump(exclude_none=True)
        kind = next(k for k in kinds if k in data)
        dates += await kinds[kind](**data).get_dates(n=1)
    return min(dates) if dates else None


async def list_deployments() -> list[dict[str, Any]]:
    """Every deployment with its flow, schedules, state and next scheduled run (UTC)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterExpectedStartTime,
        FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    rows = []
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows()}
        for dep in await client.read_deployments():
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED])),
                    expected_start_time=FlowRunFilterExpectedStartTime(
                        after_=datetime.now(timezone.utc))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            next_run, source = None, None
            if runs:
                next_run, source = runs[0].expected_start_time, "scheduled"
            elif not dep.paused and dep.schedules:
                next_run, source = await _computed_next(dep.schedules), "computed"
            status = "paused" if dep.paused else str(getattr(dep.status, "value", dep.status)
                                                     or "").lower().replace("_", " ")
            rows.append({
                "name": f"{flows.get(dep.flow_id, '?')}/{dep.name}",
                "schedules": [describe_schedule(s.schedule) for s in dep.schedules
                              if s.active],
                "status": status,
                "runs_on": f"pool {dep.work_pool_name}" if dep.work_pool_name else "served",
                "preset": (dep.parameters or {}).get("preset"),
                "next_run": next_run.astimezone(timezone.utc).isoformat() if next_run else None,
                "next_run_source": source,
            })
    return sorted(rows, key=lambda r: r["name"])


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no deployments"
    table = [("DEPLOYMENT", "PRESET", "SCHEDULE", "STATUS", "RUNS ON", "NEXT RUN (UTC)")]
    for r in rows:
        nxt = r["next_run"] or "-"
        if r["next_run"] and r["next_run_source"] == "computed":
            nxt += " (not yet created)"
        table.append((r["name"], r["preset"] or "-", "; ".join(r["schedules"]) or "none",
                      r["status"] or "-", r["runs_on"], nxt))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in table)


# ----------------------------------------------------------------------------- commands

def serve(
    args: ConfigArgs,
    cron: Optional[str] = typer.Option(None, "--cron", help='Cron schedule, e.g. "0 3 * * *".'),
    interval: Optional[float] = typer.Option(None, "--interval",
                                             help="Interval schedule, in seconds."),
    tz: Optional[str] = typer.Option(None, "--timezone", help="Time zone of the schedules "
                                     "(default UTC), e.g. Europe/Berlin."),
    flow: str = typer.Option("pipeline", "--flow", help=f"Flow to serve: {' | '.join(FLOWS)}"),
    name: str = typer.Option(DEFAULT_DEPLOYMENT, "--name", help="Deployment name."),
    tracking_uri: Optional[str] = TrackingUriOpt,
    experiment: str = ExperimentOpt,
    model_name: str = ModelNameOpt,
    limit: int = typer.Option(1, "--limit", min=1, help="Flow runs at once (a later one "
                              "waits)."),
    replace: bool = typer.Option(False, "--replace", help="Take over a work-pool "
                                 "deployment of the same name."),
    verbose: bool = VerboseOpt,
) -> None:
    """Serve a scheduled deployment of a flow from this process until Ctrl-C.

    Validates the config and preflights the runs first (``preflight.checks``): a bad value
    exits 2 before anything is registered.
    The deployment's parameters are the resolved config (JSON) and the preset.
    On Ctrl-C or SIGTERM its schedules are paused.
    """
    from runtime.console import set_verbosity

    set_verbosity(verbose)  # for this process and the flow runs it starts
    from config.overrides import resolve_config
    from preflight.checks import preflight_run
    from runtime.errors import LayerwiseError
    from tracking.tracker import default_tracking_uri

    try:
        config = resolve_config(args.preset, args.config_file, args.sets, args.dataset,
                                args.data_dir, args.seed)
        # the flow runs use this process's environment: check what they will meet
        preflight_run(config, tracking_uri or default_tracking_uri(), experiment=experiment,
                      model_name=model_name)
        parameters = flow_parameters(flow, config, args.preset, tracking_uri, experiment,
                                     model_name)
        api_url = require_api_url()
        schedules = build_schedules(cron, interval, tz)
        check_takeover(load_flow(flow).name, name, replace)
    except (LayerwiseError, ScheduleError) as exc:
        fail(str(exc))
    from runtime.serving import serve_environment, serve_until_signalled

    serve_environment()

    deployment = make_deployment(flow, name, parameters, schedules, limit)
    when = "; ".join(describe_schedule(s.schedule) for s in deployment.schedules) or "on demand"
    typer.echo(f"layerwise: serving {deployment.flow_name}/{name} ({when}), preset {args.preset}, "
               f"{config.model.n_layers} layers {config.model.hidden_sizes}, at {api_url}")
    serve_until_signalled([deployment], limit)


def list_command(
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
) -> None:
    """List the deployments on the Prefect server and their next scheduled runs."""
    import asyncio

    try:
        require_api_url()
    except ScheduleError as exc:
        fail(str(exc))
    rows = asyncio.run(list_deployments())
    typer.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


def register(app: typer.Typer) -> None:
    """Add the ``schedule`` sub-app (``serve`` and ``list``) to the ``layerwise`` CLI."""
    sub = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                      help="Scheduled runs on a Prefect server (PREFECT_API_URL).")
    sub.command("serve")(config_options()(serve))
    sub.command("list")(list_command)
    app.add_typer(sub, name="schedule")


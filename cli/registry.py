"""``layerwise runs | show | compare | models | promote``: the registry from the command line.

Only typer is imported here at module level; mlflow and pandas are imported inside the
commands, so ``layerwise --help`` stays fast. The functions that read the store are in
``tracking/queries.py``, ``tracking/stale.py`` and ``tracking/model_registry.py``; these commands
print them.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, List, Optional

import typer

from cli.common import fail, guarded_call
from cli.options import ExperimentOpt
from cli.options import TrackingUriOpt as UriOpt


class Kind(str, enum.Enum):
    pipeline = "pipeline"
    ablation = "ablation"


class Format(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a registry function; its ``LayerwiseError``s become ``error: ...`` and exit 1."""
    return guarded_call(fn, *args, code=1, **kwargs)


def _client(tracking_uri: Optional[str]) -> Any:
    from tracking import client as client_lib

    return _guarded(client_lib.connect, tracking_uri)


def _pct(value: Any, signed: bool = False) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _when(ts: Any) -> str:
    """A UTC timestamp in local time, to the second."""
    if ts is None or ts != ts:
        return "-"
    return ts.to_pydatetime().astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"


def _table(df: Any) -> str:
    """A DataFrame as aligned text, or a note when it is empty."""
    if df.empty:
        return "(none)"
    return df.astype(object).where(df.notna(), "-").to_string(index=False)


def _records(df: Any) -> list[dict[str, Any]]:
    """JSON-ready rows: timestamps as ISO 8601, NaN as null, floats exact."""
    import math

    import pandas as pd

    out = []
    for row in df.to_dict(orient="records"):
        out.append({k: (v.isoformat() if isinstance(v, pd.Timestamp) else
                        None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in row.items()})
    return out


def _emit(df: Any, fmt: Format, table: Callable[[Any], Any]) -> None:
    import json

    if fmt is Format.json:
        typer.echo(json.dumps(_records(df), indent=2))
    elif fmt is Format.csv:
        typer.echo(df.to_csv(index=False), nl=False)
    else:
        typer.echo(_table(table(df)))


# ---------------------------------------------------------------------------------------


def runs(
    experiment: str = ExperimentOpt,
    kind: Optional[Kind] = typer.Option(None, "--kind", help="Only pipeline or ablation runs."),
    filter_string: Optional[str] = typer.Option(
        None, "--filter", help="MLflow search filter, e.g. \"params.runtime.seed = '1'\" or "
        "\"metrics.test/error_pretrained < 0.08\" (keys with '/' are quoted for you: "
        "metrics.`test/error_pretrained`)."),
    limit: int = typer.Option(20, "--limit", min=1, help="At most N runs, newest first."),
    fmt: Format = typer.Option(Format.table, "--format", help="table | csv | json"),
    stale: bool = typer.Option(False, "--stale", help="List runs (parents and stages) left "
                               "RUNNING whose process is gone."),
    mark_failed: bool = typer.Option(False, "--mark-failed", help="With --stale: end them "
                                     "as FAILED."),
    older_than: float = typer.Option(24.0, "--older-than", min=0, help="With --stale: hours "
                                     "after which a RUNNING run whose process cannot be "
                                     "checked (no pid/host tags, other host) counts as stale."),
    tracking_uri: Optional[str] = UriOpt,
) -> None:
    """List recent parent runs with their key params and test errors (or --stale runs)."""
    from tracking import queries

    if mark_failed and not stale:
        fail("--mark-failed needs --stale", code=2)
    client = _client(tracking_uri)
    if stale:
        _stale(client, experiment, older_than, mark_failed, fmt)
        return
    df = _guarded(queries.list_runs, client, experiment, kind.value if kind else None,
                  filter_string, limit)

    def table(df):
        return df.assign(
            start_time=df["start_time"].map(_when), duration_s=df["duration_s"].map(_seconds),
            data_digest=df["data_digest"].map(lambda d: d[:12] if isinstance(d, str) else "-"),
            test_error_pretrained=df["test_error_pretrained"].map(_pct),
            test_error_random=df["test_error_random"].map(_pct),
            test_error_diff=df["test_error_diff"].map(lambda v: _pct(v, signed=True)),
        ).rename(columns={"model.hidden_sizes": "hidden_sizes", "duration_s": "seconds",
                          "pretrain.corruption_levels": "corruption", "runtime.seed": "seed",
                          "test_error_pretrained": "pretrained%", "test_error_random":
                          "random%", "test_error_diff": "diff_pp", "data_digest": "digest"})

    _emit(df, fmt, table)


def _stale(client: Any, experiment: str, older_than: float, mark: bool, fmt: Format) -> None:
    from tracking import stale

    df = _guarded(stale.stale_runs, client, experiment, older_than)
    _emit(df, fmt, lambda d: d.assign(start_time=d["start_time"].map(_when),
                                      age_h=d["age_h"].map(lambda h: f"{h:.1f}")))
    if mark and not df.empty:
        done = _guarded(stale.mark_failed, client, df["run_id"].tolist())
        typer.echo(f"marked {len(done)} run(s) FAILED", err=fmt is not Format.table)


def show(
    run_id: str = typer.Argument(..., help="Run id (or a unique prefix of 6+ characters)."),
    tracking_uri: Optional[str] = UriOpt,
) -> None:
    """Print a run's config (params), final metrics, stages and artifacts."""
    from tracking import queries

    client = _client(tracking_uri)
    rec = _guarded(queries.show_run, client, run_id)
    info = rec["info"]
    typer.echo(f"run {info['run_id']}  ({info['kind'] or info['name']}, {info['status']})  "
               f"experiment {info['experiment']}")
    typer.echo(f"started {_when(info['start_time'])}   duration {_seconds(info['duration_s'])} s"
               + (f"   parent {info['parent_run_id']}" if info["parent_run_id"] else "")
               + (f"   model version {info['model_version']}" if info["model_version"] else ""))
    typer.echo("\nconfig (params):")
    if not rec["params"] and info["parent_run_id"]:
        typer.echo(f"  (none here: a stage's run; the config is on its parent run, "
                   f"`layerwise show {info['parent_run_id']}`)")
    width = max((len(k) for k in rec["params"]), default=0)
    for key, value in rec["params"].items():
        typer.echo(f"  {key:<{width}}  {value}")
    typer.echo("\nmetrics:")
    width = max((len(k) for k in rec["metrics"]), default=0)
    for key, value in rec["metrics"].items():
        typer.echo(f"  {key:<{width}}  {value:.6g}")
    typer.echo("\nstages:")
    stages = rec["stages"]
    typer.echo(_table(stages.assign(duration_s=stages["duration_s"].map(_seconds))
                      .rename(columns={"duration_s": "seconds"})))
    typer.echo("\nartifacts:")
    typer.echo(_table(rec["artifacts"].assign(
        size=rec["artifacts"]["size"].map(lambda s: "-" if s is None or s != s else int(s)))))


def compare(
    run_ids: List[str] = typer.Argument(..., help="Two or more run ids; deltas are relative "
                                        "to the first."),
    tracking_uri: Optional[str] = UriOpt,
) -> None:
    """Show runs side by side: the params that differ, and metrics with deltas."""
    import pandas as pd

    from tracking import queries

    client = _client(tracking_uri)
    rec = _guarded(queries.compare_runs, client, run_ids)
    ids = rec["run_ids"]
    short = {i: i[:8] for i in ids}
    for n, i in enumerate(ids):
        typer.echo(f"[{n}] {i}" + ("  (reference)" if n == 0 else ""))
    typer.echo("\nparams that differ:")
    params = rec["params"].rename(columns=short).fillna("-")
    typer.echo("(none)" if params.empty else params.to_string())
    typer.echo("\nmetrics (delta = run - reference):")
    metrics = rec["metrics"]
    cols = {short[ids[0]]: metrics[ids[0]]}
    for i in ids[1:]:
        cols[short[i]] = metrics[i]
        cols[f"delta {short[i]}"] = rec["deltas"][i]
    table = pd.DataFrame(cols).map(lambda v: "-" if v != v else f"{v:.6g}")
    typer.echo("(none)" if table.empty else table.to_string())


def models(
    name: Optional[str] = typer.Option(None, "--name", help="Only this registered model."),
    fmt: Format = typer.Option(Format.table, "--format", help="table | csv | json"),
    tracking_uri: Optional[str] = UriOpt,
) -> None:
    """List registered models: versions, aliases, validation and test error, data digest.

    Errors are shown as stored: a fraction for classifiers, squared error per image for
    autoencoders."""
    from tracking import model_registry

    client = _client(tracking_uri)
    df = _guarded(model_registry.list_models, client, name)
    if fmt is not Format.json:
        df = df.assign(aliases=df["aliases"].map(",".join))
    _emit(df, fmt, lambda d: d.assign(
        aliases=d["aliases"].replace("", "-"), val_error=d["val_error"].map(_g),
        test_error=d["test_error"].map(_g),
        data_digest=d["data_digest"].map(lambda x: x[:12] if isinstance(x, str) else "-"),
        created=d["created"].map(_when),
    ).drop(columns=["val_error_source"]).rename(columns={"test_error_source": "from",
                                                          "data_digest": "digest"}))


def _g(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.6g}"


def promote(
    name: str = typer.Option("layerwise-classifier", "--name", help="Registered model."),
    version: Optional[int] = typer.Option(None, "--version", min=1, help="Promote this version "
                                          "(default: the best on the newest version's data)."),
    force: bool = typer.Option(False, "--force", help="Compare validation errors across "
                               "data digests: pick the best of all versions."),
    tracking_uri: Optional[str] = UriOpt,
) -> None:
    """Point the alias `champion` at the version with the lowest VALIDATION error (or at
    --version); its test error is reported beside it and never used to choose."""
    from tracking import model_registry

    client = _client(tracking_uri)
    res = _guarded(model_registry.promote, client, name, version, force)
    head = f"{res['name']} v{res['version']}"
    if not res["changed"]:
        typer.echo(f"{head} was already {res['alias']}")
    else:
        typer.echo(f"{head} is now {res['alias']}" + (
            f" (was v{res['previous']})" if res["previous"] is not None else ""))
    typer.echo(f"  val error   {_g(res['val_error'])}  (chooses)")
    typer.echo(f"  test error  {_g(res['test_error'])}  (reported only)")
    typer.echo(f"  data digest {res['data_digest']}")
    typer.echo(f"  run         {res['run_id']}")
    if version is None:
        typer.echo(f"  compared    v{', v'.join(map(str, res['candidates']))}"
                   + (f"; left out v{', v'.join(map(str, res['excluded']))} (other data digest "
                      "or no validation error)" if res["excluded"] else ""))


def register(app: typer.Typer) -> None:
    """Add ``runs``, ``show``, ``compare``, ``models`` and ``promote`` to ``app``."""
    for fn in (runs, show, compare, models, promote):
        app.command(fn.__name__)(fn)

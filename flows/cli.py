"""The ``layerwise`` command line. Heavy imports (torch, prefect, mlflow, lightning) happen
inside the commands, so ``layerwise --help`` answers in well under a second."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from flows.cli_options import (ConfigOpt, DataDirOpt, DatasetOpt, ExperimentOpt, ModelNameOpt,
                               PresetOpt, SeedOpt, SetOpt)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    help="Greedy layer-wise pretraining vs random initialisation: Prefect + Lightning + MLflow.",
)



def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _prepare_environment() -> None:
    """Embedded defaults for Prefect, set before it is imported; with no Prefect API
    configured, its ephemeral server starts now, in the background, and dies with this
    process (``flows.ephemeral_api``)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    # Prefect's 20 s default was too short for eight runs starting their ephemeral servers
    # at once on 2 busy cores (one timed out: "Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.ephemeral_api import prestart

    prestart()


def _sigterm_as_interrupt():
    """SIGTERM ends a run like Ctrl-C: MLflow runs are marked KILLED, exit is non-zero.
    Both are remembered (``tasks.runtime.note_interrupt``), so one that Python swallows is
    raised again at the next chunk of training. Returns a function that restores the
    previous handlers (for callers in the same process, such as tests)."""
    from tasks.runtime import note_interrupt

    def handler(signum, frame):  # noqa: ARG001
        raise note_interrupt(f"signal {signum}")

    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # not when SIGINT is ignored
        signal.signal(signal.SIGINT, handler)
    previous_term = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)

    return restore


def _resolve(preset, config_file, sets, dataset, data_dir, seed):
    from flows.overrides import resolve_config
    from tasks.errors import LayerwiseError

    try:
        return resolve_config(preset, config_file, sets or [], dataset, data_dir, seed)
    except LayerwiseError as exc:
        _fail(str(exc))


@app.command()
def run(
    preset: str = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    sets: Optional[List[str]] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    seed: Optional[int] = SeedOpt,
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or "
        "sqlite:///mlruns/mlflow.db)"),
    experiment: str = ExperimentOpt,
    model_name: str = ModelNameOpt,
    fresh: bool = typer.Option(False, "--fresh", help="Ignore cached stage results."),
) -> None:
    """Run the pipeline: data, pretrain each layer, fine-tune both twins, evaluate."""
    config = _resolve(preset, config_file, sets, dataset, data_dir, seed)
    _prepare_environment()
    restore_signals = _sigterm_as_interrupt()
    from tasks.errors import LayerwiseError

    typer.echo(f"layerwise: preset {preset}, {config.model.n_layers} layers "
               f"{config.model.hidden_sizes}, seed {config.runtime.seed}")
    try:
        from flows.pipeline import run_pipeline

        result = run_pipeline(config, preset=preset, tracking_uri=tracking_uri,
                          experiment=experiment, registered_model_name=model_name, fresh=fresh)
    except LayerwiseError as exc:
        _fail(str(exc), code=1)
    except BaseException as exc:
        from tasks.tracking import is_interrupt

        if not is_interrupt(exc) or isinstance(exc, typer.Exit):
            raise
        _fail("interrupted; the MLflow runs were marked KILLED. Rerun the same command to "
              "resume after the last finished stage.", code=130)
    finally:
        restore_signals()
    _print_result(result)


def _print_result(result) -> None:
    typer.echo("")
    typer.echo(f"{'init':<12}{'test error':>12}")
    typer.echo(f"{'pretrained':<12}{100 * result.test_error_pretrained:>11.2f}%")
    typer.echo(f"{'random':<12}{100 * result.test_error_random:>11.2f}%")
    typer.echo(f"{'difference':<12}{100 * result.test_error_diff:>+10.2f}pp  (pretrained − random)")
    typer.echo("")
    typer.echo(f"MLflow run {result.run_id} (experiment {result.experiment_id}); "
               f"model {result.model_name} v{result.model_version}")
    if result.tracking_uri.startswith("sqlite:"):
        typer.echo(f"Open it:  mlflow ui --backend-store-uri {result.tracking_uri}")
    else:
        typer.echo(f"Open it:  {result.tracking_uri}/#/experiments/{result.experiment_id}"
                   f"/runs/{result.run_id}")


@app.command()
def data(
    preset: str = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    sets: Optional[List[str]] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Load, verify and normalise the data; print its summary (sizes, statistics, digest)."""
    import json

    from tasks.errors import LayerwiseError

    config = _resolve(preset, config_file, sets, dataset, data_dir, None)
    from tasks.data import load_data

    try:
        bundle = load_data(config.data)
    except LayerwiseError as exc:
        _fail(str(exc), code=1)
    typer.echo(json.dumps(bundle.summary(), indent=2))


@app.command()
def config(
    preset: str = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    sets: Optional[List[str]] = SetOpt,
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    seed: Optional[int] = SeedOpt,
    keys: bool = typer.Option(False, "--keys", help="List every key --set accepts."),
    fmt: str = typer.Option("yaml", "--format", help="yaml, or json: a complete config to "
                            "pass as a deployment's `config` parameter."),
) -> None:
    """Print the resolved, validated configuration as YAML or JSON (or the keys with --keys)."""
    import json

    import yaml

    if fmt not in ("yaml", "json"):
        _fail(f"--format {fmt!r}: choose yaml or json", code=2)
    if keys:
        from flows.overrides import known_keys

        typer.echo("\n".join(known_keys()))
        return
    cfg = _resolve(preset, config_file, sets, dataset, data_dir, seed).model_dump(mode="json")
    typer.echo(json.dumps(cfg, indent=2) if fmt == "json" else yaml.safe_dump(cfg, sort_keys=False))


from flows import registry_cli  # noqa: E402  (imports typer only)

registry_cli.register(app)

from flows import schedule as schedule_cli  # noqa: E402  (imports typer only)

schedule_cli.register(app)

from flows import ablation_cli  # noqa: E402  (imports typer only)

ablation_cli.register(app)


def main() -> None:  # pragma: no cover - the console script `layerwise`
    try:
        app()
    finally:
        # The work is done; atexit handlers still run. After a pipeline run the interpreter
        # took 4.6-4.9 s to tear down the heap torch, Lightning, Prefect and MLflow leave
        # (≈ 950k objects); one collection now and freezing what survives leaves it
        # 0.7-0.8 s (+ 0.7 s here): a run's command returns ≈ 3 s sooner.
        import gc

        gc.collect()
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

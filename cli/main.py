"""The ``layerwise`` command line. Heavy imports (torch, prefect, mlflow, lightning) happen
inside the commands, so ``layerwise --help`` answers in well under a second."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import typer

from cli.common import fail, guarded_call, guarded_work, prepare_environment
from cli.options import (ConfigArgs, ExperimentOpt, ModelNameOpt, TrackingUriOpt,
                         VerboseOpt, config_options, model_name_for)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    help="Greedy layer-wise pretraining vs random initialisation: Prefect + Lightning + MLflow.",
)


@app.callback()
def _every_command() -> None:
    """Before any command: MLflow's HTTP retries bounded (``tracking.uri.HTTP_RETRIES``)."""
    from tracking.uri import bound_http_retries

    bound_http_retries()


def _resolve(args: ConfigArgs, file_sizes: bool = True):
    """The validated config the options describe; a bad value exits 2 with every problem.
    ``file_sizes=False`` leaves the size rules on a data file to the preflight, which
    reports them with the file's other problems."""
    from config.overrides import resolve_config

    return guarded_call(resolve_config, args.preset, args.config_file, args.sets, args.dataset,
                        args.data_dir, args.seed, file_sizes=file_sizes, code=2)


@app.command()
@config_options()
def run(
    args: ConfigArgs,
    tracking_uri: Optional[str] = TrackingUriOpt,
    experiment: str = ExperimentOpt,
    model_name: str = ModelNameOpt,
    fresh: bool = typer.Option(False, "--fresh", help="Ignore cached stage results."),
    objective: Optional[str] = typer.Option(
        None, "--objective", help="classify | reconstruct: fine-tune a classifier, or the "
        "unrolled deep autoencoder against PCA (registered as layerwise-autoencoder and "
        "layerwise-encoder). Default: the preset's (classify; ae-small and hinton2006: "
        "reconstruct)."),
    verbose: bool = VerboseOpt,
) -> None:
    """Run the pipeline: data, pretrain each layer, fine-tune both twins, evaluate."""
    from runtime.console import set_verbosity

    set_verbosity(verbose)  # before MLflow and Prefect are imported
    if objective is not None:
        args = dataclasses.replace(args, sets=[*args.sets, f"objective={objective}"])
    config = _resolve(args, file_sizes=False)
    model_name = model_name_for(config.objective, model_name)
    from preflight.checks import preflight_run
    from tracking.tracker import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    guarded_call(preflight_run, config, uri, experiment=experiment, model_name=model_name,
                 code=2)
    prepare_environment()
    typer.echo(f"layerwise: preset {args.preset}, objective {config.objective}, "
               f"{config.model.n_layers} layers {config.model.hidden_sizes}, "
               f"seed {config.runtime.seed}")
    with guarded_work("Rerun the same command to resume after the last finished stage.",
                      f"MLflow experiment {experiment!r} at {uri}", uri):
        from flows.pipeline import run_pipeline

        result = run_pipeline(config, preset=args.preset, tracking_uri=uri,
                              experiment=experiment, registered_model_name=model_name,
                              fresh=fresh)
    if config.objective == "reconstruct":
        _print_reconstruct(result)
    else:
        _print_result(result)


def _print_reconstruct(result) -> None:
    typer.echo("")
    typer.echo(f"{'method':<12}{'sq. error/image':>16}{'k-NN acc.':>11}")
    for method, error in result.recon_error.items():
        typer.echo(f"{method:<12}{error:>16.3f}{100 * result.knn_accuracy[method]:>10.2f}%")
    typer.echo(f"{'difference':<12}{result.recon_error_diff:>+16.3f}  (pretrained − random)")
    typer.echo("")
    typer.echo(f"MLflow run {result.run_id} (experiment {result.experiment_id}); models "
               + ", ".join(f"{n} v{v}" for n, v in result.model_versions.items()))


def _print_result(result) -> None:
    from tracking.links import mlflow_ui_command

    typer.echo("")
    typer.echo(f"{'init':<12}{'test error':>12}")
    typer.echo(f"{'pretrained':<12}{100 * result.test_error_pretrained:>11.2f}%")
    typer.echo(f"{'random':<12}{100 * result.test_error_random:>11.2f}%")
    typer.echo(f"{'difference':<12}{100 * result.test_error_diff:>+10.2f}pp  (pretrained − random)")
    typer.echo("")
    model = (f"model {result.model_name} v{result.model_version}" if result.model_version
             else "no model registered")
    typer.echo(f"MLflow run {result.run_id} (experiment {result.experiment_id}); {model}")
    if result.tracking_uri.startswith("sqlite:"):
        typer.echo(f"Open it:  {mlflow_ui_command(result.tracking_uri)}")
    else:
        from tracking.links import run_link

        typer.echo(f"Open it:  {run_link(result.tracking_uri, result.experiment_id, result.run_id)}")


@app.command()
@config_options(seed=False)
def data(
    args: ConfigArgs,
) -> None:
    """Load, verify and normalise the data; print its summary (sizes, statistics, digest)."""
    import json

    config = _resolve(args)
    from tasks.data import load_data

    bundle = guarded_call(load_data, config.data, code=1)
    typer.echo(json.dumps(bundle.summary(), indent=2))


@app.command()
@config_options()
def config(
    args: ConfigArgs,
    keys: bool = typer.Option(False, "--keys", help="List every key --set accepts."),
    fmt: str = typer.Option("yaml", "--format", help="yaml, or json: a complete config to "
                            "pass as a deployment's `config` parameter."),
) -> None:
    """Print the resolved, validated configuration as YAML or JSON (or the keys with --keys)."""
    import json

    import yaml

    if fmt not in ("yaml", "json"):
        fail(f"--format {fmt!r}: choose yaml or json", code=2)
    if keys:
        from config.overrides import known_keys

        typer.echo("\n".join(known_keys()))
        return
    cfg = _resolve(args).model_dump(mode="json")
    typer.echo(json.dumps(cfg, indent=2) if fmt == "json" else yaml.safe_dump(cfg, sort_keys=False))


from cli import registry as registry_cli  # noqa: E402  (imports typer only)

registry_cli.register(app)

from cli import schedule as schedule_cli  # noqa: E402  (imports typer only)

schedule_cli.register(app)

from cli import ablate as ablation_cli  # noqa: E402  (imports typer only)

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

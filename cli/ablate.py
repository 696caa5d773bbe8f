"""``layerwise ablate``: the pretraining-vs-random ablation over a grid of factors.

``register(app)`` adds the command to the ``layerwise`` Typer app; everything heavy (torch,
Prefect, MLflow, Dask) is imported inside the command, so ``layerwise --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import fail, guarded_call, guarded_work, prepare_environment
from cli.options import DataDirOpt, DatasetOpt, ExperimentOpt, TrackingUriOpt, VerboseOpt


def register(app: typer.Typer) -> None:
    """Add the ``ablate`` command to ``app``."""
    app.command(name="ablate")(ablate)


def ablate(
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p", help="A shipped grid, config/grids/NAME.yaml: tiny | "
        "erhan-small | erhan | reversal | vincent | vincent-tiny | tutorial | ... (default: "
        "erhan-small)."),
    grid_file: Optional[Path] = typer.Option(None, "--grid", help="A grid YAML file."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Use seeds 0..N-1."),
    workers: int = typer.Option(1, "--workers", min=1,
                                help="Local worker processes (1: in process, sequential)."),
    threads: int = typer.Option(
        1, "--threads", min=1, help="torch CPU threads per worker (cells are small: "
        "parallelise across cells with --workers instead)."),
    population: int = typer.Option(
        1, "--population", min=1, help="Train up to P seeds of a layer or a cell as "
        "one batched model (training/population.py); 1: every seed on its own."),
    dask_address: Optional[str] = typer.Option(
        None, "--dask-address", help="Run the cells on an existing Dask cluster, "
        "e.g. tcp://HOST:8786 (its workers must see the data dir and $LAYERWISE_HOME)."),
    dataset: Optional[str] = DatasetOpt,
    data_dir: Optional[Path] = DataDirOpt,
    tracking_uri: Optional[str] = TrackingUriOpt,
    experiment: str = ExperimentOpt,
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: mlruns/ablations/<timestamp>)."),
    verbose: bool = VerboseOpt,
) -> None:
    """Pretrained vs random initialisation over a grid of factors and many seeds
    (Erhan et al. 2010): a table per cell, summary statistics and figures."""
    from runtime.console import set_verbosity

    set_verbosity(verbose)  # before MLflow and Prefect are imported
    from config.grid import customise, expand, load_grid, preset_path
    from preflight.checks import preflight_grid
    from tracking.tracker import default_tracking_uri
    from tracking.links import mlflow_ui_command

    if preset and grid_file:
        fail("give --preset or --grid, not both", 2)
    path = grid_file if grid_file else guarded_call(preset_path, preset or "erhan-small",
                                                    code=2)
    grid = guarded_call(lambda: customise(load_grid(path), seeds=seeds, dataset=dataset,
                                          data_dir=data_dir), code=2)
    cells = guarded_call(expand, grid, code=2)  # every cell validated before any work starts
    uri = tracking_uri or default_tracking_uri()
    guarded_call(preflight_grid, cells, uri, experiment=experiment, population=population,
                 code=2)
    prepare_environment()
    typer.echo(f"layerwise ablate: grid {grid.name} ({path}), {len(cells)} cells, "
               + (f"Dask cluster {dask_address}" if dask_address else
                  f"{workers} local worker{'s' if workers > 1 else ''}")
               + (f", populations of up to {population} seeds" if population > 1 else ""))
    with guarded_work("Rerun the same command to resume: finished layers and cells come "
                      "from the cache.", f"MLflow experiment {experiment!r} at {uri}", uri):
        from flows.ablation import run_ablation
        from runtime.expected_errors import install

        install()  # cells that fail with the project's errors: logged without tracebacks
        result = run_ablation(grid, workers=workers, dask_address=dask_address, out_dir=out,
                              threads=threads, population=population,
                              tracking_uri=uri, experiment=experiment)
    typer.echo("")
    typer.echo(result.summary_text)
    typer.echo("")
    typer.echo(f"{result.n_ok} of {result.n_cells} cells finished, {result.n_diverged} diverged, "
               f"{len(result.failed)} failed.")
    typer.echo(f"Outputs: {result.out_dir}")
    typer.echo(f"MLflow run {result.run_id} (experiment {result.experiment_id})"
               + (f"; open it: {mlflow_ui_command(result.tracking_uri)}"
                  if result.tracking_uri.startswith("sqlite:") else ""))
    if result.failed:
        for cell, error in result.failed.items():
            typer.secho(f"  failed: {cell}: {error.splitlines()[0] if error else ''}",
                        fg=typer.colors.RED, err=True)
        fail(f"{len(result.failed)} of {result.n_cells} cells failed after their retries; "
              "rerun the same command to retry them (finished cells come from the cache)", 1)

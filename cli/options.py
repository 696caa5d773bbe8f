"""Options shared by the commands that resolve a pipeline config (``layerwise run``,
``data``, ``config``, ``schedule serve``, ``ablate``) or read and write MLflow; typer only.
Declared once here; every command imports them from this module."""

import typer

PresetOpt = typer.Option("default", "--preset", "-p", help="quick | default | tutorial")
ConfigOpt = typer.Option(None, "--config", help="YAML file of config sections to override.")
SetOpt = typer.Option(None, "--set", help="section.field=value (repeatable), e.g. "
                      "--set pretrain.corruption_levels=[0.1,0.2]")
DatasetOpt = typer.Option(None, "--dataset", help="mnist | fashion-mnist | kmnist | "
                          "mnist-bg-rand | mnist-rot, or PATH.npz / .csv / .parquet")
DataDirOpt = typer.Option(None, "--data-dir", help="torchvision data root "
                          "(default: $LAYERWISE_DATA_DIR or ./data)")
SeedOpt = typer.Option(None, "--seed", help="runtime.seed")
ExperimentOpt = typer.Option("layerwise", "--experiment", help="MLflow experiment.")
ModelNameOpt = typer.Option("layerwise-classifier", "--model-name",
                            help="Registered model name.")
TrackingUriOpt = typer.Option(None, "--tracking-uri", help="MLflow URI (default: "
                              "$MLFLOW_TRACKING_URI or sqlite:///$LAYERWISE_HOME/mlflow.db, "
                              "LAYERWISE_HOME=./mlruns).")

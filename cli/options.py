"""Options shared by the commands that resolve a pipeline config (``layerwise run``,
``data``, ``config``, ``schedule serve``, ``ablate``) or read and write MLflow; typer only.
Declared once here; every command imports them from this module."""

import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from tracking.vocabulary import AUTOENCODER_MODEL, CLASSIFIER_MODEL

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
ModelNameOpt = typer.Option(CLASSIFIER_MODEL, "--model-name",
                            help="Registered model name (default: layerwise-classifier, or "
                            "layerwise-autoencoder for --objective reconstruct).")


def model_name_for(objective: str, model_name: str) -> str:
    """The registered model a run joins: ``--model-name``, whose default follows the
    objective (the deep autoencoder joins ``layerwise-autoencoder``)."""
    if objective == "reconstruct" and model_name == CLASSIFIER_MODEL:
        return AUTOENCODER_MODEL
    return model_name
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also show Lightning's, MLflow's "
                          "and Prefect's own console lines (default: one line per stage).")
TrackingUriOpt = typer.Option(None, "--tracking-uri", help="MLflow URI (default: "
                              "$MLFLOW_TRACKING_URI or sqlite:///$LAYERWISE_HOME/mlflow.db, "
                              "LAYERWISE_HOME=./mlruns).")


@dataclass(frozen=True)
class ConfigArgs:
    """The options that resolve a pipeline config, as one value (see :func:`config_options`)."""

    preset: str
    config_file: Optional[Path]
    sets: list[str]
    dataset: Optional[str]
    data_dir: Optional[Path]
    seed: Optional[int]


#: The config options in the order ``--help`` lists them: (name, annotation, typer option).
_CONFIG_PARAMS = (("preset", str, PresetOpt), ("config_file", Optional[Path], ConfigOpt),
                  ("sets", Optional[List[str]], SetOpt), ("dataset", Optional[str], DatasetOpt),
                  ("data_dir", Optional[Path], DataDirOpt), ("seed", Optional[int], SeedOpt))


def config_options(seed: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the config options (``--preset``, ``--config``, ``--set``, ``--dataset``,
    ``--data-dir`` and, with ``seed``, ``--seed``), declared here once. The command declares a
    parameter ``args: ConfigArgs`` in their place and receives them in it.

    Typer reads a command's parameters from ``inspect.signature``, which honours
    ``__signature__``; the wrapper's signature is the command's with ``args`` replaced by the
    options.
    """
    extra = [p for p in _CONFIG_PARAMS if seed or p[0] != "seed"]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(command).parameters.values())
        at = [p.name for p in params].index("args")
        options = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default=default, annotation=annotation)
                   for name, annotation, default in extra]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {"seed": None, **{name: kwargs.pop(name) for name, _, _ in extra}}
            values["sets"] = list(values["sets"] or [])
            return command(args=ConfigArgs(**values), **kwargs)

        wrapper.__signature__ = inspect.Signature(params[:at] + options + params[at + 1:])
        hints = typing.get_type_hints(command)
        wrapper.__annotations__ = {**{k: v for k, v in hints.items() if k != "args"},
                                   **{name: annotation for name, annotation, _ in extra}}
        return wrapper

    return decorate

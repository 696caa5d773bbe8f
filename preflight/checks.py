"""Checks before any MLflow run or training: everything that can be known up front is
checked, and every problem is reported together (``runtime.errors.PreflightError``).

- names: the experiment and the registered model, by MLflow's rules;
- the tracking URI: scheme, driver, reachable, writable (``tracking.uri``);
- ``LAYERWISE_HOME`` (checkpoints, the embedded store and its artifacts): writable, with
  free space for the run's checkpoints;
- the accelerator and precision: available on this machine;
- the data file: an ``.npz``'s arrays and labels (``sources.headers.file_shape``) and
  the size rules on it (``config.sizes``);
- peak memory: the estimate of ``preflight.memory`` against this machine's (and the
  GPU's) free memory.

``preflight_run`` checks one pipeline run (``layerwise run``, ``schedule serve``);
``preflight_grid`` every cell of an ablation before its first cell trains.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from config.stages import NAMED_DATASETS
from preflight.memory import (FLOAT, Shape, available_bytes, classifier_params,
                              dae_params, memory_problem)
from runtime.errors import LayerwiseError, PreflightError
from sources.headers import file_shape
from tracking.uri import check_reachable, check_tracking_uri, sqlite_path, writable_dir_problem

MNIST_SHAPE = Shape(n_rows=70_000, n_features=784, n_classes=10)
MAX_EXPERIMENT_NAME = 500  # mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH
#: Figures, CSVs, the store's own growth and Prefect's results, beyond the weights.
DISK_MARGIN_BYTES = 64 * 2**20


def name_problems(experiment: str, model_name: Optional[str]) -> list[str]:
    """MLflow's rules for an experiment name (non-empty, at most 500 characters) and a
    registered model name (not blank, no '/' or ':', no '..' or leading '/' path parts);
    ``mlflow.utils.validation`` holds them, and a test ties the two together."""
    problems = []
    if not experiment or len(experiment) > MAX_EXPERIMENT_NAME:
        problems.append(f"--experiment {experiment!r} is not a valid MLflow experiment name: "
                        f"give 1 to {MAX_EXPERIMENT_NAME} characters, e.g. --experiment layerwise")
    if model_name is not None:
        parts = model_name.split("/")
        if (not model_name.strip() or "/" in model_name or ":" in model_name
                or any(p in ("..", ".") for p in parts) or "\\" in model_name):
            problems.append(f"--model-name {model_name!r} is not a valid MLflow registered "
                            "model name: use letters, digits, '-', '_' and '.', without '/', "
                            "':' or '..', e.g. --model-name layerwise-classifier")
    return problems


@functools.lru_cache(maxsize=8)
def data_shape(dataset: str) -> tuple[Optional[Shape], list[str]]:
    """The data's shape and every problem of an ``.npz`` (``sources.headers.file_shape``:
    missing or unpaired arrays, row and feature counts, NaN/inf or values beyond float32,
    labels that are not class indices, test labels that training never has), all at once;
    ``(None, [])`` for a table (the data stage checks it) or a named dataset's files.
    """
    if dataset.lower() in NAMED_DATASETS:  # all 60k + 10k, 28×28, 10 classes
        return MNIST_SHAPE, []
    shape, problems = file_shape(dataset)
    return (None if shape is None else Shape(*shape)), problems


def file_problems(config: Any) -> list[str]:
    """A data file's problems together: its contents (:func:`data_shape`) and the size
    rules the config breaks on it (``config.sizes``, from the header)."""
    if config.data.is_named:
        return []
    from config.overrides import size_problems_of

    problems = data_shape(config.data.dataset)[1]
    try:
        return problems + size_problems_of(config)
    except LayerwiseError as exc:  # the file cannot be read: data_shape said why
        return problems or [str(exc)]


def home_problems(config: Any, uri: str, cells: int = 1) -> list[str]:
    """``LAYERWISE_HOME`` (and a local store's artifact folder) writable, with free space
    for the checkpoints: every DAE layer, both fine-tuned arms, each kept about three times
    (the stage's checkpoint, its MLflow artifact copy, the registered model), per cell."""
    from runtime.home import layerwise_home

    home = layerwise_home()
    problem = writable_dir_problem(home, "LAYERWISE_HOME", "set LAYERWISE_HOME to a writable "
                                   "folder (it holds checkpoints, cached results and the "
                                   "embedded MLflow store)")
    if problem:
        return [problem]
    folders = [home / "artifacts"] if sqlite_path(uri) or "://" not in uri else []
    for folder in folders:
        problem = writable_dir_problem(folder, "the MLflow artifact folder",
                                       "make it writable or set LAYERWISE_HOME elsewhere")
        if problem:
            return [problem]
    shape = MNIST_SHAPE if config.data.is_named else data_shape(config.data.dataset)[0]
    if shape is None:
        return []
    widths = [shape.n_features, *config.model.hidden_sizes]
    weights = sum(dae_params(a, b, config.model.tied_weights) for a, b in zip(widths, widths[1:]))
    weights += 2 * classifier_params(shape.n_features, config.model.hidden_sizes,
                                     min(shape.n_classes, max(2, shape.n_rows)))
    need = cells * (3 * FLOAT * weights + DISK_MARGIN_BYTES)
    free = shutil.disk_usage(home).free
    if free < need:
        return [f"LAYERWISE_HOME {home} has {free / 2**30:.2f} GiB free, but the run's "
                f"checkpoints need about {need / 2**30:.2f} GiB: free space there, or set "
                "LAYERWISE_HOME to a folder on a larger disk"]
    return []


def _gpu_present(accelerator: str) -> bool:
    """Whether torch must be asked about a GPU (imported only then: it takes ~3 s)."""
    if accelerator in ("gpu", "cuda", "mps"):
        return True
    return accelerator == "auto" and (Path("/proc/driver/nvidia").exists()
                                      or bool(os.environ.get("CUDA_VISIBLE_DEVICES")))


def device_problems(runtime: Any) -> tuple[list[str], Optional[int]]:
    """The accelerator and precision asked for are available. Returns the problems and the
    free bytes of the GPU that will be used (None: the CPU)."""
    if not _gpu_present(runtime.accelerator):
        return [], None
    import torch

    fix = "use --set runtime.accelerator=cpu (or auto, which falls back to the CPU)"
    if runtime.accelerator == "mps":
        if not torch.backends.mps.is_available():
            return [f"runtime.accelerator='mps' but this machine has no usable Apple GPU: "
                    f"{fix}"], None
        return [], None
    if not torch.cuda.is_available():
        if runtime.accelerator == "auto":
            return [], None
        return [f"runtime.accelerator={runtime.accelerator!r} but this machine has no usable "
                f"CUDA GPU (no NVIDIA driver or device): {fix}"], None
    if runtime.precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        return [f"runtime.precision='bf16-mixed' but the GPU ({torch.cuda.get_device_name()}) "
                "has no bfloat16 support: use --set runtime.precision=32-true"], None
    return [], torch.cuda.mem_get_info()[0]


def config_problems(config: Any, population: int) -> list[str]:
    """Accelerator, labels and peak memory of one config."""
    problems, gpu_free = device_problems(config.runtime)
    shape = data_shape(config.data.dataset)[0]
    data_problems = file_problems(config)
    problems += data_problems
    if shape is None or data_problems:
        return problems
    host = memory_problem(config, shape, population, available_bytes(),
                          "this machine's available memory")
    device = gpu_free is not None and memory_problem(
        config, shape, population, gpu_free, "the GPU's free memory", key="device")
    return problems + [p for p in (host, device) if p]


def _raise(problems: list[str]) -> None:
    unique = list(dict.fromkeys(problems))  # the same problem in many cells: once
    if unique:
        raise PreflightError(unique)


def prefect_api_problems() -> list[str]:
    """A Prefect server named by ``PREFECT_API_URL`` answers ``/health`` (unset: the run
    starts its own ephemeral API, nothing to check)."""
    api = os.environ.get("PREFECT_API_URL", "").strip()
    if not api:
        return []
    try:
        check_reachable(api.rstrip("/") + "/health", "the Prefect API (PREFECT_API_URL)",
                        "Start the server, or unset PREFECT_API_URL to run without one.")
    except LayerwiseError as exc:
        return [str(exc)]
    return []


def preflight_run(config: Any, uri: str, *, experiment: str, model_name: Optional[str],
                  population: int = 2) -> None:
    """Check one pipeline run before anything starts.

    Args:
        config: The resolved ``PipelineConfig``.
        uri: The MLflow tracking URI the run will use.
        experiment: The MLflow experiment name.
        model_name: The registered model name (None: nothing is registered).
        population: Members trained at once (the twins: 2).

    Raises:
        PreflightError: listing every problem found.
    """
    problems = name_problems(experiment, model_name) + check_tracking_uri(uri)
    problems += prefect_api_problems()
    problems += home_problems(config, uri) + config_problems(config, population)
    _raise(problems)


def preflight_grid(cells: list[Any], uri: str, *, experiment: str, population: int) -> None:
    """Check an ablation cell by cell before its first cell trains (each problem once, with
    the cells it concerns).

    Args:
        cells: The grid's cells (``config.grid.Cell``), each with its ``config``.
        uri: The MLflow tracking URI.
        experiment: The MLflow experiment name.
        population: Seeds trained at once (``--population``).

    Raises:
        PreflightError: listing every problem found.
    """
    problems = name_problems(experiment, None) + check_tracking_uri(uri) + prefect_api_problems()
    if cells:
        problems += home_problems(cells[0].config, uri, cells=len(cells))
    by_problem: dict[str, list[str]] = {}
    for cell in cells:
        for problem in config_problems(cell.config, population):
            by_problem.setdefault(problem, []).append(cell.id)
    for problem, ids in by_problem.items():
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        problems.append(f"cell {shown}: {problem}")
    _raise(problems)

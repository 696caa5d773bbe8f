"""What both pipeline flows (``flows.pipeline``: classify, ``flows.reconstruct``: the deep
autoencoder) share: one nested MLflow run per stage with its report line, running a task
under a readable name with its cache state, the flow run's name, and the data and
pretraining stages themselves."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from pydantic import BaseModel

from config.parameters import resolve_flow_config
from config.stages import PipelineConfig, check_train_size
from training.observer import Observers
from runtime.errors import ConfigError
from runtime.progress import ProgressLine, watching
from tasks.data import load_data_task
from tasks.pretrain import pretrain_layer_task
from tracking.conventions import dataset_inputs, run_name, stage_description
from tracking.live import LiveMetrics
from tracking.records import log_data, log_layer
from tracking.tracker import Tracker, interrupt_cause, is_interrupt
from tracking.vocabulary import CACHED_TAG, NOTE_TAG, STAGE_TAG, TRAINED_TOGETHER_TAG


class StageReport(BaseModel):
    name: str
    seconds: float
    cached: bool
    mlflow_run_id: str
    artifacts_from: Optional[str] = None  # the earlier run holding identical artifacts



class StageRecorder:
    """Opens one nested MLflow run per stage, watches its epochs (live metrics and a
    progress line) and prints one line when the stage finishes."""

    def __init__(self, tracker: Tracker, parent_id: str, echo: Callable[..., None],
                 objective: str = "classify"):
        self.tracker, self.parent_id, self.echo = tracker, parent_id, echo
        self.objective = objective
        self.reports: list[StageReport] = []

    @contextlib.contextmanager
    def stage(self, name: str, live: Optional[str] = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One stage's run; ``live``: the metric prefix its epochs are logged under as
        they end (None: the stage trains nothing)."""
        with self.together([name], live, name) as [(run_id, info)]:
            yield run_id, info

    @contextlib.contextmanager
    def together(self, names: Sequence[str], live: Optional[str], label: str
                 ) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        """The runs of stages that train as one population (member i is ``names[i]``):
        all open while it trains, each logging its member's epochs as they end, each
        reporting the wall time they shared (tagged ``layerwise.trained_together``).

        Yields:
            (run id, info) per stage. Set ``info["cached"]`` and
            ``info["artifacts_from"]``; ``info["live"]`` is the set of runs whose epochs
            were logged live (their history needs no logging at the end).
        """
        started = time.perf_counter()
        shared = {TRAINED_TOGETHER_TAG: ",".join(names)} if len(names) > 1 else {}
        with contextlib.ExitStack() as runs:
            opened = []
            for name in names:
                tags = {STAGE_TAG: name, NOTE_TAG: stage_description(name, self.objective),
                        **shared}
                run_id = runs.enter_context(self.tracker.run(name, tags, self.parent_id))
                opened.append((run_id, {"cached": False, "artifacts_from": None}))
            metrics = LiveMetrics(self.tracker, {i: (run_id, live)
                                                 for i, (run_id, _) in enumerate(opened)})
            for _, info in opened:
                info["live"] = metrics.logged
            progress = ProgressLine(label, lambda line, console: self.echo(line,
                                                                           console=console))
            try:
                with watching(Observers(metrics if live else None, progress)):
                    yield opened
            except BaseException as exc:
                if is_interrupt(exc):  # the Prefect log's last line; the CLI prints its own
                    self.echo(f"  stopped {label} ({interrupt_cause(exc)}): rerun the same "
                              "command to continue from its last epoch checkpoint",
                              console=False)
                raise
            for run_id, info in opened:
                self.tracker.set_tags(run_id, {CACHED_TAG: str(info["cached"]).lower()})
        seconds = time.perf_counter() - started
        for name, (run_id, info) in zip(names, opened):
            self.reports.append(StageReport(name=name, seconds=seconds, cached=info["cached"],
                                            mlflow_run_id=run_id,
                                            artifacts_from=info["artifacts_from"]))
            others = [n for n in names if n != name]
            notes = [*(["artifacts reused"] if info["artifacts_from"] else []),
                     *(["from cache"] if info["cached"] else []),
                     *([f"trained together with {', '.join(others)}"] if others else [])]
            self.echo(f"  done  {name:<22} {seconds:8.1f} s" + "".join(f"  ({n})" for n in notes))

    def reused_note(self, model: str, version: str, model_reused: bool) -> Optional[str]:
        """One line saying what this run reused from earlier runs, or None."""
        parts = [f"model {model} v{version} (same weights and data)"] if model_reused else []
        stages = [r.name for r in self.reports if r.artifacts_from]
        if stages:
            parts.append(f"the artifacts of {', '.join(stages)} (identical files)")
        return "; ".join(parts) or None


def run_task(task: Any, name: str, fresh: bool, info: dict[str, Any], *args: Any) -> Any:
    """Run a Prefect task under a readable task-run name; note whether it came from cache."""
    state = task.with_options(task_run_name=name, refresh_cache=fresh or None)(
        *args, return_state=True
    )
    info["cached"] = state.name == "Cached"
    return state.result()


def data_and_pretraining(config: PipelineConfig, tracker: Tracker, parent: str,
                         stages: StageRecorder, fresh: bool) -> tuple[Any, list[Any]]:
    """The stages both objectives share: load the data, then pretrain layer by layer (each
    a cached task, so a reconstruct run reuses a classifier run's layers and vice versa).

    Returns:
        The ``DataBundle`` and the ``LayerResult`` of every layer, bottom first.
    """
    with stages.stage("load-data") as (run, info):
        data = run_task(load_data_task, "load-data", fresh, info, config.data)
        info["artifacts_from"] = log_data(tracker, run, data)
    tracker.log_inputs(parent, dataset_inputs(data, str(
        config.data.data_dir / "MNIST" / "raw" if config.data.is_mnist
        else config.data.dataset)))
    tracker.log_params(parent, {"data.digest": data.digest})
    try:
        check_train_size(config, len(data.x_train) if config.data.n_train is None
                         else config.data.n_train)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    stack = []
    for k in range(config.model.n_layers):
        name = f"pretrain-layer-{k + 1}"
        with stages.stage(name, live=f"pretrain/layer_{k + 1}") as (run, info):
            layer = run_task(pretrain_layer_task, name, fresh, info, k, config, data, stack)
            info["artifacts_from"] = log_layer(tracker, run, layer,
                                               history=run not in info["live"])
        stack.append(layer)
    return data, stack


def flow_run_name() -> str:
    """The Prefect flow run's name: the MLflow parent run's, ``<preset>-s<seed>-<UTC mmdd-HHMMSS>``."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        config, preset, _ = resolve_flow_config(params.get("config"), params.get("preset"),
                                                params.get("overrides") or [])
    except (ConfigError, ValueError, TypeError):  # the flow itself reports the mistake
        return run_name(str(params.get("preset") or "invalid"), 0)
    return run_name(preset, config.runtime.seed)

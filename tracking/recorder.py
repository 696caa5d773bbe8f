"""The MLflow record of one pipeline run, beside the computing it records.

A ``PipelineRecorder`` opens the parent run and wraps each stage: it opens the stage's
child run (the twins' two runs at once), runs the stage's Prefect task, notes whether
the task came from cache, logs each epoch as it ends (``tracking.live``) with a progress
line (``runtime.progress``), records the result by its type (``tracking.records``),
uploading identical artifacts once, and prints one line per stage. The comparison and the
registration of the served models are its last two steps. The tasks it runs know
nothing of MLflow.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional, Sequence

from pydantic import BaseModel

from training.observer import Observers
from runtime.console import announce
from runtime.devices import eval_device, precision_used
from runtime.progress import ProgressLine, watching
from tracking.conventions import (dataset_inputs, results_note, run_description, run_name,
                                  stage_description)
from tracking.links import run_link
from tracking.live import LiveMetrics
from tracking.records import record
from tracking.registration import Registered, register_release
from tracking.stale import end_dead_runs
from tracking.tracker import Tracker, environment_params, interrupt_cause, is_interrupt
from tracking.vocabulary import (CACHED_TAG, KIND_TAG, NOT_REGISTERED_TAG, NOTE_TAG,
                                 STAGE_TAG, TRAINED_TOGETHER_TAG)

ARMS = ("pretrained", "random")  # the twins' stage runs are finetune-<arm>


class StageReport(BaseModel):
    name: str
    seconds: float
    cached: bool
    mlflow_run_id: str
    artifacts_from: Optional[str] = None  # the earlier run holding identical artifacts


class PipelineRecorder:
    """The parent run of one pipeline run and a child run per stage (a context manager).

    Args:
        tracker: The MLflow writer of the run's experiment.
        config: The run's complete ``PipelineConfig``.
        preset: The preset it names; recorded with ``overrides`` relative to it.
        fresh: Recompute every stage instead of reusing cached results.
        name: The parent run's name (default ``<preset>-s<seed>-<UTC time>``).
        echo: Where the lines for the user go (printed and in the Prefect flow run's log).
    """

    def __init__(self, tracker: Tracker, config: Any, preset: str, overrides: Sequence[str],
                 fresh: bool,
                 name: Optional[str] = None, echo: Callable[..., None] = announce):
        self.config, self.preset, self.overrides = config, preset, list(overrides)
        self.fresh, self.echo = fresh, echo
        self.name = name or run_name(preset, config.runtime.seed)
        self.tracker = tracker
        self.reports: list[StageReport] = []
        self.evaluate_run: Optional[str] = None
        self._live: set[str] = set()  # runs whose epochs were logged as they ended
        self._runs = contextlib.ExitStack()

    def __enter__(self) -> "PipelineRecorder":
        if killed := end_dead_runs(self.tracker.client, self.tracker.experiment):
            self.echo(f"  marked {len(killed)} MLflow run(s) of an earlier, killed attempt "
                      "KILLED")
        config = self.config
        self.description = run_description("pipeline", self.preset, config)
        self.parent = self._runs.enter_context(self.tracker.run(
            self.name, {KIND_TAG: "pipeline", NOTE_TAG: self.description}))
        try:
            self.link = run_link(self.tracker.uri, self.tracker.experiment_id, self.parent)
            self.echo(f"MLflow run: {self.link}", console=False)
            from config.stages import flatten

            device = str(eval_device(config.runtime))
            self.tracker.log_params(self.parent, {
                **flatten(config), "preset": self.preset, "overrides": self.overrides,
                **environment_params(device, precision_used(config.runtime))})
        except BaseException as exc:  # the parent run ends FAILED or KILLED, never RUNNING
            self._runs.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._runs.__exit__(*exc)

    def stage(self, name: str, task: Any, *args: Any, live: Optional[str] = None) -> Any:
        """Run ``task(*args)`` as the stage ``name`` in its own child run; record its result.

        Args:
            live: The metric prefix its epochs are logged under as they end (None: the
                stage trains nothing).
        """
        def work(runs: list[str]) -> tuple[Any, bool, list[Optional[str]]]:
            result, cached = self._run_task(task, name, *args)
            return result, cached, [self._record(runs[0], result)]

        result = self._together([name], live, name, work)
        if type(result).__name__ == "DataBundle":
            self._data_inputs(result)
        if type(result).__name__ in ("Evaluation", "ReconstructEvaluation"):
            self.evaluate_run = self.reports[-1].mlflow_run_id
        return result

    def twins(self, task: Any, *args: Any) -> dict[str, Any]:
        """Run the twins' fine-tuning ``task`` (one population of two: one pass over the
        data, the same data order by construction) with each arm in its own run, open while
        they train. Returns each arm's result."""
        def work(runs: list[str]) -> tuple[Any, bool, list[Optional[str]]]:
            twins, cached = self._run_task(task, task.name, *args)
            return twins, cached, [self._record(run, twins.arms[arm])
                                   for arm, run in zip(ARMS, runs)]

        names = [f"finetune-{arm}" for arm in ARMS]
        return dict(self._together(names, "finetune", task.name, work).arms)

    def compare(self, comparison: Any) -> Any:
        """Log the comparison's metrics (``tasks.compare.Comparison``) in the evaluate run
        and the parent run."""
        for run in (self.evaluate_run, self.parent):
            self.tracker.log_metrics(run, comparison.metrics)
        return comparison

    def register(self, release: Any, names: dict[str, str]) -> Registered:
        """Register the served models of ``release`` (``tasks.release.Release``) under
        ``names[kind]``, logged in the evaluate run (``tracking.registration``); tag the
        parent with the versions, what was reused, or why nothing was registered."""
        done = register_release(self.tracker, self.evaluate_run, self.parent, release, names)
        kind = next(iter(release.models))
        tags: dict[str, Any] = {}
        if done.versions:
            version = done.versions[kind]
            arm_runs = [r.mlflow_run_id for r in self.reports if r.name.startswith("finetune-")]
            tags |= {"layerwise.model_version": version,
                     "layerwise.registered_model": f"{names[kind]}/{version}",
                     NOTE_TAG: self.description + "\n\n" + results_note(
                         self.tracker.experiment_id, arm_runs, names[kind], version)}
            if len(done.versions) > 1:
                tags |= {f"layerwise.model_version.{k}": v for k, v in done.versions.items()}
        else:
            tags[NOT_REGISTERED_TAG] = done.refused
            self.echo(f"warning: model {names[kind]} not registered: {done.refused}")
        reused = self._reused_note(names, done)
        if reused:
            tags["layerwise.reused"] = reused
            self.echo(f"  reused {reused}")
        self.tracker.set_tags(self.parent, tags)
        return done

    def _reused_note(self, names: dict[str, str], done: Registered) -> Optional[str]:
        """One line saying what this run reused from earlier runs, or None."""
        parts = ([", ".join(f"model {names[k]} v{v}" for k, v in done.versions.items())
                  + " (same weights and data)"] if done.reused and done.versions else [])
        stages = [r.name for r in self.reports if r.artifacts_from]
        if stages:
            parts.append(f"the artifacts of {', '.join(stages)} (identical files)")
        return "; ".join(parts) or None

    def _run_task(self, task: Any, name: str, *args: Any) -> tuple[Any, bool]:
        """Run a Prefect task under a readable task-run name; note whether it came from
        cache."""
        state = task.with_options(task_run_name=name, refresh_cache=self.fresh or None)(
            *args, return_state=True)
        return state.result(), state.name == "Cached"

    def _data_inputs(self, data: Any) -> None:
        """The data as the parent run's MLflow dataset input, and its digest as a param."""
        self.tracker.log_inputs(self.parent, dataset_inputs(data, data.location))
        self.tracker.log_params(self.parent, {"data.digest": data.digest})

    def _record(self, run: str, result: Any) -> Optional[str]:
        """Record a stage's result in its run; its history only if not logged live."""
        return record(self.tracker, run, result, history=run not in self._live)

    def _together(self, names: Sequence[str], live: Optional[str], label: str,
                  work: Callable[[list[str]], tuple[Any, bool, list[Optional[str]]]]) -> Any:
        """Run ``work`` with the runs of stages that train as one population (member i is
        ``names[i]``): all open while it trains, each logging its member's epochs as they
        end, each reporting the wall time they shared (tagged
        ``layerwise.trained_together``).

        Args:
            live: The metric prefix of the epochs (None: the stages train nothing).
            label: The progress line's name for the population.
            work: Given the run ids, returns the result, whether it came from cache and,
                per run, the earlier run whose identical artifacts it reused (or None).
        """
        started = time.perf_counter()
        shared = {TRAINED_TOGETHER_TAG: ",".join(names)} if len(names) > 1 else {}
        objective = getattr(self.config, "objective", "classify")
        with contextlib.ExitStack() as stack:
            runs = [stack.enter_context(self.tracker.run(
                name, {STAGE_TAG: name, NOTE_TAG: stage_description(name, objective),
                       **shared}, self.parent)) for name in names]
            metrics = LiveMetrics(self.tracker, {i: (run, live) for i, run in enumerate(runs)})
            self._live = metrics.logged
            progress = ProgressLine(label, lambda line, console: self.echo(line,
                                                                           console=console))
            try:
                with watching(Observers(metrics if live else None, progress)):
                    result, cached, reused = work(runs)
            except BaseException as exc:
                if is_interrupt(exc):  # the Prefect log's last line; the CLI prints its own
                    self.echo(f"  stopped {label} ({interrupt_cause(exc)}): rerun the same "
                              "command to continue from its last epoch checkpoint",
                              console=False)
                raise
            for run in runs:
                self.tracker.set_tags(run, {CACHED_TAG: str(cached).lower()})
        seconds = time.perf_counter() - started
        for name, run, artifacts_from in zip(names, runs, reused):
            self.reports.append(StageReport(name=name, seconds=seconds, cached=cached,
                                            mlflow_run_id=run, artifacts_from=artifacts_from))
            others = [n for n in names if n != name]
            notes = [*(["artifacts reused"] if artifacts_from else []),
                     *(["from cache"] if cached else []),
                     *([f"trained together with {', '.join(others)}"] if others else [])]
            self.echo(f"  done  {name:<22} {seconds:8.1f} s" + "".join(f"  ({n})" for n in notes))
        return result

"""An interrupt Python swallowed (a ``KeyboardInterrupt`` raised inside a garbage-collector
callback is only printed) is raised again at the next chunk of training; a stopped stage
says so in the flow run's log."""

from __future__ import annotations

import contextlib

from types import SimpleNamespace

import pytest
import torch

from config.stages import RuntimeConfig
from models.dae import DenoisingAutoencoder
from runtime import interrupts
from training.dae_training import DAESystem
from training.trainer import fit, make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU


def train(epochs: int = 2) -> DAESystem:
    x = torch.rand(40, 10, generator=torch.Generator().manual_seed(0))
    system = DAESystem([DenoisingAutoencoder(10, 4)], x, x, noise_seeds=[0], order_seeds=[0],
                       batch_size=5, optimizer={"name": "sgd", "lr": 0.1})
    trainer = make_trainer(RuntimeConfig(accelerator="cpu"), epochs)
    fit(trainer, system)
    return system


def test_a_remembered_interrupt_stops_training_at_the_next_chunk(monkeypatch):
    monkeypatch.setattr(interrupts, "_INTERRUPTS", [])
    assert train().trainer.current_epoch == 2  # nothing pending: trains to the end
    swallowed = interrupts.note_interrupt("signal 2")
    assert isinstance(swallowed, KeyboardInterrupt)  # ... and, say, lost in a GC callback
    with pytest.raises(KeyboardInterrupt, match="training interrupted"):
        train()


class _Tracker:
    """Just enough of ``tracking.tracker.Tracker`` for a stage's runs."""

    @contextlib.contextmanager
    def run(self, name, tags, parent_id=None):
        yield f"run-{name}"

    def set_tags(self, run_id, tags):
        pass


class _Task:
    """A stage's Prefect task that raises ``exc`` when run."""

    name = "pretrain-layer-2"

    def __init__(self, exc):
        self.exc = exc

    def with_options(self, **options):
        def run(*args, return_state=False):
            raise self.exc
        return run


@pytest.mark.parametrize("exc,cause", [(KeyboardInterrupt("signal 2"), "Ctrl-C"),
                                       (KeyboardInterrupt("signal 15"), "SIGTERM")])
def test_a_stopped_stage_leaves_a_last_line_saying_what_stopped_it(exc, cause):
    """The flow run's Prefect log (``console=False``: the CLI prints its own line once)."""
    from tracking.recorder import PipelineRecorder

    lines = []
    recorder = PipelineRecorder(_Tracker(), SimpleNamespace(runtime=SimpleNamespace(seed=0)),
                                "quick", [], fresh=False, name="parent",
                                echo=lambda line, console=True: lines.append((line, console)))
    recorder.parent = "parent"
    with pytest.raises(KeyboardInterrupt):
        recorder.stage("pretrain-layer-2", _Task(exc), live="pretrain/layer_2")
    assert lines == [(f"  stopped pretrain-layer-2 ({cause}): rerun the same command to "
                      "continue from its last epoch checkpoint", False)]
    lines.clear()
    with pytest.raises(ValueError):  # a failure is not an interruption
        recorder.stage("pretrain-layer-2", _Task(ValueError("x")))
    assert lines == []


def test_only_the_first_signal_interrupts_the_second_says_it_is_stopping(monkeypatch, capsys):
    """A second Ctrl-C while the runs' end is being recorded cut that short (Prefect then
    logged "Finished in state Running()"); it is now only acknowledged."""
    import signal

    from cli.common import interrupts_on_signals

    monkeypatch.setattr(interrupts, "_INTERRUPTS", [])
    restore = interrupts_on_signals()
    try:
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        handler(signal.SIGINT, None)  # acknowledged, not raised
        handler(signal.SIGTERM, None)
    finally:
        restore()
    assert capsys.readouterr().err.count("already stopping") == 2


def test_a_failure_while_the_parent_run_opens_still_ends_it(monkeypatch):
    """Whatever fails after the parent run started (here, logging its params) ends it with
    the failure, as a ``with`` around the whole run would: no run is left RUNNING."""
    import tracking.recorder as recorder_module
    from config.overrides import resolve_config
    from tracking.recorder import PipelineRecorder

    ended = []

    class Failing(_Tracker):
        uri, experiment, experiment_id, client = "sqlite:///x.db", "e", "1", None

        @contextlib.contextmanager
        def run(self, name, tags, parent_id=None):
            try:
                yield f"run-{name}"
            except BaseException as exc:
                ended.append((name, type(exc).__name__))
                raise
            ended.append((name, "finished"))

        def log_params(self, run_id, params):
            raise OSError("disk full")

    monkeypatch.setattr(recorder_module, "end_dead_runs", lambda client, experiment: [])
    recorder = PipelineRecorder(Failing(), resolve_config("quick"), "quick", [], fresh=False,
                                name="parent", echo=lambda line, console=True: None)
    with pytest.raises(OSError, match="disk full"):
        with recorder:
            pass
    assert ended == [("parent", "OSError")]

"""Seeds, devices, Lightning trainers and the cache keys of the stages."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from config.stages import RuntimeConfig

#: The behaviour version of each stage kind, a part of its cache key. Bump a kind's number
#: in the change that alters what the stage computes (its training code, the inputs it
#: reads, the files it writes); results cached under the old number are then retrained.
#: Keys name no file, so moving or renaming a module neither changes nor breaks the cache.
STAGE_VERSIONS = {"pretrain": 2, "finetune": 1, "evaluate": 1, "reconstruct": 1}


class Seed:
    """The purposes a run's seed is derived for, named here only:
    ``derive_seed(seed, Seed.PRETRAIN_NOISE, k)``. The strings are part of every derived
    seed (changing one changes every result), and sharing one is what makes two runs draw
    the same numbers: both fine-tuning twins read ``FINETUNE_ORDER`` and ``FINETUNE_DROPOUT``.
    """

    PRETRAIN_INIT = "pretrain-init"  # layer k's initial weights
    PRETRAIN_NOISE = "pretrain-noise"  # layer k's corruption
    PRETRAIN_ORDER = "pretrain-order"  # layer k's data order
    FIGURE_NOISE = "figure-noise"  # the corrupted examples of layer k's figure
    RANDOM_INIT = "random-init"  # the random-init twin's hidden weights
    FINETUNE_ORDER = "finetune-order"  # the twins' data order
    FINETUNE_DROPOUT = "finetune-dropout"  # the twins' dropout masks


def derive_seed(seed: int, *purpose: Any) -> int:
    """A 63-bit seed for one purpose (``"init", 2``), stable across processes and machines."""
    text = "/".join(str(p) for p in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def stage_key(stage: str, *, kind: str, **parts: Any) -> str:
    """Cache key of a stage: its name, its kind's behaviour version and JSON-able stable
    inputs (config dumps, digests of data and of the checkpoints it reads).

    Args:
        stage: The stage's name, e.g. ``pretrain-layer-2``.
        kind: Its kind, a key of ``STAGE_VERSIONS``.
        parts: The stage's inputs.
    """
    payload = json.dumps({"stage": stage, "version": STAGE_VERSIONS[kind], **parts},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def runtime_key(runtime: RuntimeConfig) -> dict[str, Any]:
    """The runtime settings of a stage's cache key: ``auto`` precision resolved (a result
    trained in bf16 on one machine is not a float32 result on another), the evaluation
    batch size and the checkpoint interval left out (they change no result)."""
    unchanging = {"eval_batch_size", "checkpoint_seconds"}
    return {**runtime.model_dump(mode="json", exclude=unchanging),
            "precision": precision_used(runtime)}


def layerwise_home() -> Path:
    """Where the embedded stores, checkpoints and cached stages live.

    ``$LAYERWISE_HOME`` when set; else, in a flow run that a Prefect worker or runner
    started in its own process (``PREFECT__FLOW_RUN_ID`` set; a worker's runs start in the
    checkout, ``prefect.yaml``'s pull step), the user's data directory
    (``user_data_home()``), never the code directory; else ``./mlruns`` of the current
    directory, as for MLflow's own ``./mlruns`` (``layerwise run``, ``make run``).
    """
    if os.environ.get("LAYERWISE_HOME"):
        return Path(os.environ["LAYERWISE_HOME"]).expanduser().resolve()
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        return user_data_home()
    return Path("mlruns").resolve()


def user_data_home() -> Path:
    """``$XDG_DATA_HOME/layerwise``, by default ``~/.local/share/layerwise`` (the XDG base
    directory for a user's data, where ``make deploy`` puts a worker's stores too)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return (Path(base) / "layerwise").resolve()


def stage_dir(stage: str, key: str) -> Path:
    """The directory of one cached stage result (checkpoints and figures)."""
    return layerwise_home() / "stages" / f"{stage}-{key[:16]}"


def progress_bar_enabled() -> bool:
    """Progress bars in a terminal, none in CI or when output is piped."""
    return sys.stderr.isatty() and not os.environ.get("CI")


#: Signals the CLI turned into ``KeyboardInterrupt`` (``note_interrupt``).
_INTERRUPTS: list[str] = []


def note_interrupt(reason: str) -> KeyboardInterrupt:
    """Remember an interrupt before raising it (``raise note_interrupt(...)``).

    A ``KeyboardInterrupt`` that lands while the garbage collector runs a weakref callback
    is printed as "Exception ignored" and lost (seen once in the SIGINT test: the run then
    finished); remembered, it is raised again at the next chunk of training."""
    _INTERRUPTS.append(reason)
    return KeyboardInterrupt(reason)


def _raise_pending_interrupt(*_: Any) -> None:
    if _INTERRUPTS:
        raise KeyboardInterrupt(f"{_INTERRUPTS[-1]} (raised again: it was swallowed)")


def _interrupt_callback() -> Any:
    import lightning as L

    class RaisePendingInterrupt(L.Callback):
        """Re-raises an interrupt that was swallowed, once per training or validation batch
        (a chunk of minibatches: about 1,000 examples)."""

        on_train_batch_end = staticmethod(_raise_pending_interrupt)
        on_validation_batch_end = staticmethod(_raise_pending_interrupt)

    return RaisePendingInterrupt()


def make_trainer(runtime: RuntimeConfig, max_epochs: int, callbacks: Sequence[Any] = ()
                 ) -> Any:
    """The engine's trainer (``models.engine.make_trainer``) for one stage, with the
    accelerator, precision and determinism of ``runtime``, a progress bar in a terminal, and
    the callback that re-raises a swallowed interrupt."""
    from models.engine import make_trainer as engine_trainer
    from runtime.console import verbose

    return engine_trainer(max_epochs, accelerator=runtime.accelerator,
                          precision=precision_used(runtime),
                          deterministic=runtime.deterministic,
                          progress=progress_bar_enabled(),
                          callbacks=[*callbacks, _interrupt_callback()], quiet=not verbose())


def precision_used(runtime: RuntimeConfig) -> str:
    """The Lightning precision the stages train in: ``runtime.precision``, with ``auto``
    resolved for the training device (``runtime.precision.resolve_precision``)."""
    from runtime.precision import resolve_precision

    device_type = "mps" if runtime.accelerator == "mps" else eval_device(runtime).type
    return resolve_precision(runtime.precision, device_type)


def fit(trainer: Any, system: Any, datamodule: Any = None) -> None:
    """``trainer.fit`` that lets Ctrl-C propagate as ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt``, ignores further SIGINTs and calls
    ``sys.exit(1)``; the pipeline needs the interrupt itself (to mark its MLflow runs KILLED
    and exit 130), and SIGINT handling restored for the stages that follow.
    """
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.fit(system, datamodule=datamodule)
    except SystemExit as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted") from exc
        raise
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def eval_device(runtime: RuntimeConfig) -> "Any":
    """The device used for codes and evaluation: CUDA when asked for or auto and present."""
    import torch

    if runtime.accelerator in ("gpu", "cuda") or (
        runtime.accelerator == "auto" and torch.cuda.is_available()
    ):
        return torch.device("cuda")
    return torch.device("cpu")

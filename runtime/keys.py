"""Seeds, the stages' behaviour versions and their cache keys: every string here is part
of a derived seed or of a key, so changing one changes results or retrains what it covers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from runtime.devices import RuntimeSettings, precision_used
from runtime.home import layerwise_home

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


class KeyedRuntimeSettings(RuntimeSettings, Protocol):
    """Runtime settings that dump themselves as JSON (the runtime config does, as a
    pydantic model)."""

    fused_update: bool

    def model_dump(self, *, mode: str, exclude: set[str]) -> dict[str, Any]: ...


def runtime_key(runtime: KeyedRuntimeSettings) -> dict[str, Any]:
    """The runtime settings of a stage's cache key: ``auto`` precision resolved (a result
    trained in bf16 on one machine is not a float32 result on another), the evaluation
    batch size and the checkpoint interval left out (they change no result), and
    ``fused_update`` only when on (it rounds differently; off, keys stay as they were)."""
    unchanging = {"eval_batch_size", "checkpoint_seconds"}
    if not runtime.fused_update:  # off: the keys of runs made before it
        unchanging.add("fused_update")
    return {**runtime.model_dump(mode="json", exclude=unchanging),
            "precision": precision_used(runtime)}


def stage_dir(stage: str, key: str) -> Path:
    """The directory of one cached stage result (checkpoints and figures)."""
    return layerwise_home() / "stages" / f"{stage}-{key[:16]}"

"""Where and how a stage computes: the evaluation device, the training precision with
``auto`` resolved (``runtime.precision``), and whether a progress bar is shown.

The runtime settings are read by their fields only (``RuntimeSettings``): the runtime
config satisfies them, and this layer imports no config.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol

from runtime.precision import resolve_precision


class RuntimeSettings(Protocol):
    """The fields of the runtime config that decide the device and the precision."""

    accelerator: str  # auto, cpu, gpu, cuda or mps (Lightning's names)
    precision: str  # auto, 32-true or bf16-mixed
    deterministic: bool


def eval_device(runtime: RuntimeSettings) -> "Any":
    """The device used for codes and evaluation: CUDA when asked for or auto and present."""
    import torch

    if runtime.accelerator in ("gpu", "cuda") or (
        runtime.accelerator == "auto" and torch.cuda.is_available()
    ):
        return torch.device("cuda")
    return torch.device("cpu")


def precision_used(runtime: RuntimeSettings) -> str:
    """The Lightning precision the stages train in: ``runtime.precision``, with ``auto``
    resolved for the training device (``runtime.precision.resolve_precision``)."""
    device_type = "mps" if runtime.accelerator == "mps" else eval_device(runtime).type
    return resolve_precision(runtime.precision, device_type)


def progress_bar_enabled() -> bool:
    """Progress bars in a terminal, none in CI or when output is piped."""
    return sys.stderr.isatty() and not os.environ.get("CI")

"""What every benchmark shares: the device, the machine's name, the data, and timers."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
#: ``../shared/data`` beside the repository, as the tests use it.
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"


def device() -> torch.device:
    """CUDA when there is a GPU, else the CPU (what ``accelerator="auto"`` picks)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def float32_trainer(epochs: int) -> Any:
    """The stages' trainer (``training.trainer.make_trainer``) on ``device()``, in float32."""
    from config.stages import RuntimeConfig
    from training.trainer import make_trainer

    return make_trainer(RuntimeConfig(accelerator="auto", precision="32-true"), epochs)


def machine_name(dev: torch.device) -> str:
    """A stable name for the results file: ``cpu-2core-x86_64`` or ``cuda-nvidia-h100-...``."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev).lower()
        return "cuda-" + "-".join("".join(c if c.isalnum() else " " for c in name).split())
    return f"cpu-{os.cpu_count()}core-{platform.machine() or 'unknown'}"


def describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return (f"cpu: {os.cpu_count()} cores, {platform.machine()}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load_avg() -> Optional[float]:
    """1-minute load average: other work on the machine makes the timings noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@dataclass
class Data:
    x_train: torch.Tensor  # (N, 784) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    source: str


def load(data_dir: Optional[Path], n_train: int, n_valid: int) -> Data:
    """Real MNIST through ``tasks.data.load_data`` when ``data_dir`` holds it, else generated
    tensors of the same shape and type (sparse binary-ish images, random labels)."""
    root = Path(data_dir or os.environ.get("LAYERWISE_DATA_DIR") or DEFAULT_DATA_DIR)
    if (root / "MNIST" / "raw").is_dir():
        from config.stages import DataConfig
        from tasks.data import load_data

        d = load_data(DataConfig(data_dir=root, download=False))
        if len(d.x_train) >= n_train:
            return Data(d.x_train[:n_train], d.y_train[:n_train], d.x_valid[:n_valid],
                        d.y_valid[:n_valid], f"MNIST from {root}")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n_train + n_valid, 784, generator=g) < 0.2).float()
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "generated (MNIST shape)")


def best_time(fn: Callable[[], None], dev: torch.device, repeats: int = 3,
              min_seconds: float = 0.05) -> float:
    """Seconds per call of ``fn``: the best of ``repeats`` timed loops of ≥ min_seconds."""
    fn()
    sync(dev)
    n, elapsed = 1, 0.0
    while True:  # calibrate the loop length
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(dev)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
        n *= 2
    best = elapsed / n
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(dev)
        best = min(best, (time.perf_counter() - t0) / n)
    return best

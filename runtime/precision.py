"""``runtime.precision = auto``: bfloat16 mixed precision where the hardware computes bf16
natively, float32 elsewhere.

bf16-mixed keeps float32 master weights and runs the matmuls in bfloat16 under
``torch.autocast`` (Lightning's ``bf16-mixed`` plugin; the engine's fused SGD steps follow it,
``training.population``). It pays only where bf16 products are native:

- a CPU with AVX-512 BF16 (``avx512_bf16``) or AMX (``amx_bf16``), where bf16 matmuls run
  several times faster than float32 (docs/benchmarks.md, "Precision"); without those
  instructions oneDNN emulates bf16 and is slower than float32;
- a CUDA GPU of compute capability ≥ 8.0 (Ampere and later: bf16 tensor cores).

bf16-mixed is not worse than float32, paired over seeds for sigmoid and ReLU networks,
pretrained and random (docs/benchmarks.md, "Precision"), so ``auto`` is the default. Whatever reproduces float32 results pins ``32-true``: the
``tutorial`` preset (also: at batch 1 the casts make bf16 slower than float32 on a CPU) and the
ablation grids behind the README's results (``config/grids/``).
"""

from __future__ import annotations

import functools
from pathlib import Path

#: /proc/cpuinfo flags of native bfloat16 arithmetic on x86 CPUs.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The first CUDA compute capability with bf16 tensor cores (Ampere).
CUDA_BF16_CAPABILITY = (8, 0)


#: Where Linux lists the CPU's feature flags.
CPUINFO = "/proc/cpuinfo"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of ``CPUINFO``); empty where the
    file does not exist (macOS, Windows)."""
    try:
        text = Path(CPUINFO).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device_type: str) -> bool:
    """True where ``device_type`` (``cpu`` or ``cuda``) computes bf16 products natively.

    Args:
        device_type: The training device's type, as ``torch.device.type``.
    """
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_capability() >= CUDA_BF16_CAPABILITY
    if device_type == "cpu":
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    return False  # mps and the rest: float32


def resolve_precision(precision: str, device_type: str) -> str:
    """The Lightning precision a run uses: ``precision`` itself unless it is ``auto``, which
    is ``bf16-mixed`` where bf16 is native (``native_bf16``) and ``32-true`` elsewhere.

    Args:
        precision: ``runtime.precision``.
        device_type: The training device's type (``runtime.devices.eval_device``).
    """
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(device_type) else "32-true"

"""(a) the project's engine against (b) a bare PyTorch loop of the same math.

One process, the same data and config, at batch sizes 1, 20 and 256. (a) is exactly what
``tasks.pretrain.pretrain_layer`` / ``tasks.finetune.finetune`` run: the engine at P = 1
(``train_dae_population`` / ``train_classifier_population``, fused SGD steps, per-epoch
history and early stopping) in ``training.trainer.make_trainer``; a ``LoopTimer`` callback
marks the first and last training step. (b) is ``benchmarks.bare``. Both run one epoch of a fixed
number of steps after a warm-up, best of ``repeats``, interleaved.

Throughput counts the training steps only (first step's start to last step's end); the
rest of a stage (trainer construction, set-up, validation, tear-down) is ``fixed_s``.
GFLOP/s counts matmul FLOPs only and is set against ``torch.mm`` of the same shapes, timed
alone on this machine (``matmul_gflops``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import torch

from benchmarks import bare
from benchmarks.common import Data, best_time, device, sync
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from config.stages import RuntimeConfig
from runtime.keys import Seed, derive_seed
from training.trainer import make_trainer

#: Steps per measurement: a few seconds each on 2 CPU cores.
STEPS = {1: 2000, 20: 500, 256: 100}
N_VALID = 1000


@dataclass(frozen=True)
class DAESpec:
    """The pretraining stage measured: layer 1 of the default preset."""

    n_visible: int = 784
    n_hidden: int = 1000
    level: float = 0.1
    lr: float = 0.01


@dataclass(frozen=True)
class ClassifierSpec:
    """The fine-tuning stage measured: two hidden layers of the default preset's width."""

    sizes: tuple[int, ...] = (784, 1000, 1000)
    n_classes: int = 10
    lr: float = 0.1


class LoopTimer(L.Callback):
    """Seconds from the first training step's start to the last one's end, per fit."""

    def __init__(self):
        self.loop_s = self.loop_cpu_s = self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            sync(pl_module.device)
            self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            sync(pl_module.device)
            self.loop_s += time.perf_counter() - self._t0
            self.loop_cpu_s += time.process_time() - self._c0


# --- matmul FLOPs of one step, and the machine's rate at those shapes --------------------------


def dae_shapes(B: int, V: int, H: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul in one tied-dA step: forward encoder and decoder; backward
    decoder dW and dh, encoder dW (the input needs no gradient)."""
    return [(B, V, H), (B, H, V), (H, B, V), (B, V, H), (H, B, V)]


def classifier_shapes(B: int, sizes: list[int], n_classes: int) -> list[tuple[int, int, int]]:
    """Forward x W_lᵀ, backward dW_l for every layer and dX_l for all but the first."""
    dims = [*sizes, n_classes]
    out = []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        out += [(B, n_in, n_out), (n_out, B, n_in)]
        if i > 0:
            out.append((B, n_out, n_in))
    return out


def flops(shapes: list[tuple[int, int, int]]) -> float:
    return float(sum(2 * m * k * n for m, k, n in shapes))


def matmul_rate(shapes: list[tuple[int, int, int]], dev: torch.device,
                dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of ``torch.mm`` over exactly these shapes in ``dtype``, timed alone."""
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(m, k, generator=g).to(dev, dtype),
              torch.rand(k, n, generator=g).to(dev, dtype)) for m, k, n in shapes]

    def step():
        for a, b in pairs:
            torch.mm(a, b)

    return flops(shapes) / best_time(step, dev, repeats=5, min_seconds=0.1) / 1e9


# --- one stage, both ways ----------------------------------------------------------------------


def dae_init(spec: DAESpec, seed: int) -> dict[str, torch.Tensor]:
    """The initial dA weights of runtime seed ``seed``, as ``tasks.pretrain`` draws them."""
    g = torch.Generator().manual_seed(derive_seed(seed, Seed.PRETRAIN_INIT, 0))
    dae = DenoisingAutoencoder(spec.n_visible, spec.n_hidden, corruption_level=spec.level,
                               generator=g)
    return {k: v.clone() for k, v in dae.state_dict().items()}


def project_pretrain(spec: DAESpec, init, x, x_valid, B: int, seed: int,
                     precision: str = "32-true") -> bare.Run:
    """``tasks.pretrain.pretrain_layer``'s training, as it runs it."""
    started = time.perf_counter()
    dae = DenoisingAutoencoder(spec.n_visible, spec.n_hidden, corruption_level=spec.level)
    dae.load_state_dict(init)
    timer = LoopTimer()
    result = train_dae_population(
        [dae], x, x_valid, noise_seeds=[seed], order_seeds=[seed], batch_size=B,
        optimizer={"name": "sgd", "lr": spec.lr},
        trainer=make_trainer(RuntimeConfig(accelerator="auto", precision=precision), 1,
                             [timer]))
    return bare.Run(timer.loop_s, timer.loop_cpu_s, time.perf_counter() - started,
                    result.states[0], result.histories[0])


def bare_pretrain(spec: DAESpec, init, x, x_valid, B: int, seed: int) -> bare.Run:
    return bare.dae(init, x, x_valid, level=spec.level, lr=spec.lr, batch_size=B,
                    noise_seed=seed, order_seed=seed)


def classifier_init(spec: ClassifierSpec, seed: int) -> dict[str, torch.Tensor]:
    """The random arm's initial weights of runtime seed ``seed``, as ``tasks.finetune``."""
    g = torch.Generator().manual_seed(derive_seed(seed, Seed.RANDOM_INIT))
    clf = DeepClassifier.random_init(spec.sizes[0], list(spec.sizes[1:]), spec.n_classes,
                                     generator=g)
    return {k: v.clone() for k, v in clf.state_dict().items()}


def project_finetune(spec: ClassifierSpec, init, data: Data, B: int, seed: int,
                     precision: str = "32-true") -> bare.Run:
    """``tasks.finetune.finetune``'s training, as it runs it."""
    started = time.perf_counter()
    clf = DeepClassifier.random_init(spec.sizes[0], list(spec.sizes[1:]), spec.n_classes)
    clf.load_state_dict(init)
    timer = LoopTimer()
    result = train_classifier_population(
        [clf], data.x_train, data.y_train, data.x_valid, data.y_valid, order_seeds=[seed],
        batch_size=B, optimizer={"name": "sgd", "lr": spec.lr},
        trainer=make_trainer(RuntimeConfig(accelerator="auto", precision=precision), 1,
                             [timer]))
    return bare.Run(timer.loop_s, timer.loop_cpu_s, time.perf_counter() - started,
                    result.states[0], result.histories[0])


def bare_finetune(spec: ClassifierSpec, init, data: Data, B: int, seed: int) -> bare.Run:
    return bare.classifier(init, data.x_train, data.y_train, data.x_valid, data.y_valid,
                           lr=spec.lr, batch_size=B, order_seed=seed)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def compare(stage: str, B: int, project: Callable[..., bare.Run], floor: Callable[[], bare.Run],
            shapes: list[tuple[int, int, int]], repeats: int, dev: torch.device,
            log: Callable[[str], None]) -> dict[str, Any]:
    """(a) ``project()`` against (b) ``floor()``, and, where bf16 is native
    (``runtime.precision.native_bf16``), (a) in ``bf16-mixed``: each loop's matmul GFLOP/s
    beside ``torch.mm``'s at the same shapes and dtype, and their fraction."""
    from runtime.precision import native_bf16

    steps = STEPS[B]
    bf16 = native_bf16(dev.type)
    runs_a, runs_b, runs_h = [], [], []
    for _ in range(repeats):  # interleaved, so that load changes hit both alike
        runs_a.append(project())
        runs_b.append(floor())
        if bf16:
            runs_h.append(project("bf16-mixed"))
    a = min(runs_a, key=lambda r: r.loop_s)
    b = min(runs_b, key=lambda r: r.loop_s)
    a_cpu = min(r.loop_cpu_s for r in runs_a)
    b_cpu = min(r.loop_cpu_s for r in runs_b)
    per_step = flops(shapes)
    rate = matmul_rate(shapes, dev)
    row = {
        "stage": stage, "batch_size": B, "steps": steps,
        "project_examples_per_s": round(steps * B / a.loop_s, 1),
        "bare_examples_per_s": round(steps * B / b.loop_s, 1),
        "ratio": round(b.loop_s / a.loop_s, 3),
        "overhead_us_per_step": round((a.loop_s - b.loop_s) / steps * 1e6, 1),
        "project_us_per_step": round(a.loop_s / steps * 1e6, 1),
        "bare_us_per_step": round(b.loop_s / steps * 1e6, 1),
        # CPU time of the same loops: robust to other processes sharing the cores
        "cpu_ratio": round(b_cpu / a_cpu, 3),
        "cpu_overhead_us_per_step": round((a_cpu - b_cpu) / steps * 1e6, 1),
        "gflops": round(per_step * steps / a.loop_s / 1e9, 2),
        "bare_gflops": round(per_step * steps / b.loop_s / 1e9, 2),
        "matmul_gflops": round(rate, 2),
        # the loop's share of the machine's matmul rate (issue 17: >= 0.6 at B=20, 0.85 at 256)
        "matmul_fraction": round(per_step * steps / a.loop_s / 1e9 / rate, 3),
        "project_fixed_s": round(a.total_s - a.loop_s, 3),
        "bare_fixed_s": round(b.total_s - b.loop_s, 3),
        "max_weight_diff": _max_diff(a.state, b.state),
    }
    if runs_h:
        h = min(runs_h, key=lambda r: r.loop_s)
        rate_h = matmul_rate(shapes, dev, torch.bfloat16)
        row.update({
            "bf16_gflops": round(per_step * steps / h.loop_s / 1e9, 2),
            "matmul_gflops_bf16": round(rate_h, 2),
            "bf16_matmul_fraction": round(per_step * steps / h.loop_s / 1e9 / rate_h, 3),
            "bf16_speedup": round(a.loop_s / h.loop_s, 3),
            "bf16_max_weight_diff": _max_diff(h.state, a.state),
        })
    log(f"  {stage:<8} B={B:<4} project {row['project_examples_per_s']:>9.0f} ex/s  "
        f"bare {row['bare_examples_per_s']:>9.0f} ex/s  ratio {row['ratio']:.3f}  "
        f"overhead {row['overhead_us_per_step']:>7.1f} µs/step  "
        f"(cpu ratio {row['cpu_ratio']:.3f}, {row['cpu_overhead_us_per_step']:.0f} µs)  "
        f"{row['gflops']:.1f}/{row['matmul_gflops']:.1f} GFLOP/s  "
        f"= {row['matmul_fraction']:.2f} of torch.mm  "
        f"(same weights: max diff {row['max_weight_diff']:.1e})")
    if runs_h:
        log(f"  {'':<8} bf16-mixed: {row['bf16_gflops']:.1f}/{row['matmul_gflops_bf16']:.1f} "
            f"GFLOP/s = {row['bf16_matmul_fraction']:.2f} of torch.mm in bf16, "
            f"{row['bf16_speedup']:.2f}x the float32 loop")
    return row


def run(data: Data, repeats: int, batch_sizes=(1, 20, 256), log=print,
        dae: DAESpec = DAESpec(), clf: ClassifierSpec = ClassifierSpec()) -> list[dict[str, Any]]:
    dev = device()
    rows = []
    seed = 0
    x_valid, y_valid = data.x_valid[:N_VALID].to(dev), data.y_valid[:N_VALID].to(dev)
    for B in batch_sizes:
        n = STEPS[B] * B
        sub = Data(data.x_train[:n].to(dev), data.y_train[:n].to(dev), x_valid, y_valid, "")
        warm = Data(sub.x_train[: 20 * B], sub.y_train[: 20 * B], x_valid[:100], y_valid[:100], "")
        init = dae_init(dae, seed)
        project_pretrain(dae, init, warm.x_train, warm.x_valid, B, seed)  # warm-up
        bare_pretrain(dae, init, warm.x_train, warm.x_valid, B, seed)
        rows.append(compare(
            "pretrain", B,
            lambda p="32-true": project_pretrain(dae, init, sub.x_train, x_valid, B, seed, p),
            lambda: bare_pretrain(dae, init, sub.x_train, x_valid, B, seed),
            dae_shapes(B, dae.n_visible, dae.n_hidden), repeats, dev, log))
        init = classifier_init(clf, seed)
        project_finetune(clf, init, warm, B, seed)
        bare_finetune(clf, init, warm, B, seed)
        rows.append(compare(
            "finetune", B, lambda p="32-true": project_finetune(clf, init, sub, B, seed, p),
            lambda: bare_finetune(clf, init, sub, B, seed),
            classifier_shapes(B, list(clf.sizes), clf.n_classes), repeats, dev, log))
    return rows

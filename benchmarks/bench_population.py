"""P = 32 seeds as one batched population against 32 sequential single runs (same work).

Two sizes, batch 20, one epoch of 2,000 examples (100 steps) plus validation on 1,000:
``tiny``, the ``tiny`` ablation grid's 32-unit layers (a 784→32 dA, a 784-32-32-10
classifier), where per-step overhead dominates; and ``quick``, the ``quick`` preset's
(784→256 dA with masking 0.1, SGD lr 0.05; 784-256-128-10 classifier, SGD lr 0.1), where
on a CPU the arithmetic does. Member s uses runtime seed s's pipeline seeds (``derive_seed``).
The sequential baseline is the bare loop (``benchmarks.bare``), the fastest single run there
is; the project's single run (the engine at P = 1) is timed on two seeds and scaled to 32
(``sequential_project_s_est``). The population must end with the sequential runs' weights
(``max_weight_diff``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from benchmarks import bare
from benchmarks.bench_training import (
    ClassifierSpec,
    DAESpec,
    classifier_init,
    dae_init,
    project_finetune,
    project_pretrain,
)
from benchmarks.common import Data, device, float32_trainer, sync
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from runtime.keys import Seed, derive_seed

P = 32
BATCH = 20
N_TRAIN, N_VALID = 2000, 1000
CONFIGS = {
    "tiny": (DAESpec(n_visible=784, n_hidden=32, level=0.1, lr=0.05),
             ClassifierSpec(sizes=(784, 32, 32), n_classes=10, lr=0.1)),
    "quick": (DAESpec(n_visible=784, n_hidden=256, level=0.1, lr=0.05),
              ClassifierSpec(sizes=(784, 256, 128), n_classes=10, lr=0.1)),
}
PROJECT_SAMPLE = 2  # Lightning runs timed to estimate 32 of them


def _timed(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, float, float]:
    """Result, wall seconds and process CPU seconds of ``fn()``."""
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _max_diff(a: list[dict], b: list[dict]) -> float:
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


def run(data: Data, log=print, members: int = P, repeats: int = 2) -> dict[str, Any]:
    """Both sizes; the top level sums them (the same work both ways). ``repeats``
    interleaved runs of each side, the fastest kept (a shared machine only slows runs)."""
    stages = []
    for name, (dae, clf) in CONFIGS.items():
        stages += run_config(name, dae, clf, data, log, members, repeats)

    def total(key: str) -> float:
        return sum(r[key] for r in stages)

    return {"P": members, "population_s": round(total("population_s"), 3),
            "sequential_s": round(total("sequential_s"), 3),
            "speedup": round(total("sequential_s") / total("population_s"), 3),
            "cpu_speedup": round(total("sequential_cpu_s") / total("population_cpu_s"), 3),
            "sequential_project_s_est": round(total("sequential_project_s_est"), 2),
            "stages": stages}


def run_config(config: str, DAE: DAESpec, CLF: ClassifierSpec, data: Data, log,
               members: int, repeats: int = 2) -> list[dict[str, Any]]:
    dev = device()
    x, y = data.x_train[:N_TRAIN].to(dev), data.y_train[:N_TRAIN].to(dev)
    xv, yv = data.x_valid[:N_VALID].to(dev), data.y_valid[:N_VALID].to(dev)
    seeds = list(range(members))
    noise = [derive_seed(s, Seed.PRETRAIN_NOISE, 0) for s in seeds]
    order = [derive_seed(s, Seed.PRETRAIN_ORDER, 0) for s in seeds]
    corder = [derive_seed(s, Seed.FINETUNE_ORDER) for s in seeds]
    dae_inits = [dae_init(DAE, s) for s in seeds]
    clf_inits = [classifier_init(CLF, s) for s in seeds]

    def daes():
        out = []
        for init in dae_inits:
            d = DenoisingAutoencoder(DAE.n_visible, DAE.n_hidden, corruption_level=DAE.level)
            d.load_state_dict(init)
            out.append(d)
        return out

    def classifiers():
        out = []
        for init in clf_inits:
            c = DeepClassifier.random_init(CLF.sizes[0], list(CLF.sizes[1:]), CLF.n_classes)
            c.load_state_dict(init)
            out.append(c)
        return out

    def pop_dae():
        return train_dae_population(daes(), x, xv, noise_seeds=noise, order_seeds=order,
                                    batch_size=BATCH, optimizer={"name": "sgd", "lr": DAE.lr},
                                    trainer=float32_trainer(1))

    def seq_dae():
        return [bare.dae(i, x, xv, level=DAE.level, lr=DAE.lr, batch_size=BATCH,
                         noise_seed=n, order_seed=o) for i, n, o in zip(dae_inits, noise, order)]

    def pop_clf():
        return train_classifier_population(classifiers(), x, y, xv, yv, order_seeds=corder,
                                           batch_size=BATCH,
                                           optimizer={"name": "sgd", "lr": CLF.lr},
                                           trainer=float32_trainer(1))

    def seq_clf():
        return [bare.classifier(i, x, y, xv, yv, lr=CLF.lr, batch_size=BATCH, order_seed=o)
                for i, o in zip(clf_inits, corder)]

    # warm-up: a population of two and one single run of each kind
    train_dae_population(daes()[:2], x[:200], xv[:100], noise_seeds=noise[:2],
                         order_seeds=order[:2], batch_size=BATCH,
                         optimizer={"name": "sgd", "lr": DAE.lr}, trainer=float32_trainer(1))
    bare.dae(dae_inits[0], x[:200], xv[:100], level=DAE.level, lr=DAE.lr, batch_size=BATCH,
             noise_seed=1, order_seed=1)

    stages = []
    for stage, pop_fn, seq_fn, project_fn in (
        ("pretrain", pop_dae, seq_dae,
         lambda s: project_pretrain(DAE, dae_inits[s], x, xv, BATCH, noise[s])),
        ("finetune", pop_clf, seq_clf,
         lambda s: project_finetune(CLF, clf_inits[s], Data(x, y, xv, yv, ""), BATCH,
                                    corder[s])),
    ):
        pop_s = seq_s = pop_cpu = seq_cpu = float("inf")
        for _ in range(repeats):  # interleaved, the fastest of each kept
            pop, wall, cpu = _timed(pop_fn, dev)
            pop_s, pop_cpu = min(pop_s, wall), min(pop_cpu, cpu)
            seq, wall, cpu = _timed(seq_fn, dev)
            seq_s, seq_cpu = min(seq_s, wall), min(seq_cpu, cpu)
        _, project_s, _ = _timed(lambda: [project_fn(s) for s in range(PROJECT_SAMPLE)], dev)
        row = {
            "config": config, "stage": stage, "P": members, "batch_size": BATCH,
            "steps_per_member": -(-N_TRAIN // BATCH),
            "population_s": round(pop_s, 3), "sequential_s": round(seq_s, 3),
            "speedup": round(seq_s / pop_s, 3),
            "population_cpu_s": round(pop_cpu, 3), "sequential_cpu_s": round(seq_cpu, 3),
            # process CPU time: robust to other processes sharing the cores
            "cpu_speedup": round(seq_cpu / pop_cpu, 3),
            "sequential_project_s_est": round(project_s * members / PROJECT_SAMPLE, 2),
            "speedup_vs_project": round(project_s * members / PROJECT_SAMPLE / pop_s, 3),
            "max_weight_diff": _max_diff(pop.states, [r.state for r in seq]),
        }
        log(f"  {config:<5} {stage:<8} P={members}  population {pop_s:6.2f} s  sequential (bare) "
            f"{seq_s:6.2f} s  speedup {row['speedup']:.2f}× (CPU time {row['cpu_speedup']:.2f}×)  "
            f"sequential project (est.) "
            f"{row['sequential_project_s_est']:6.1f} s  ({row['speedup_vs_project']:.1f}×)  "
            f"max weight diff {row['max_weight_diff']:.1e}")
        stages.append(row)
    return stages

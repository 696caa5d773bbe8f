"""The deep autoencoder's fine-tuning step, torch's default Adam against its fused one
(``runtime.fused_update``), and where the step's time goes (issue 26, item 3: is it
autograd that makes ``hinton2006`` long?).

At ``hinton2006``'s shapes (784-1000-500-250-30 and its untied mirror, the two arms as one
population of P = 2, batch 100, cross-entropy), in float32 and under bf16 autocast (as
``bf16-mixed`` trains, with float32 master weights), in one process, interleaved:

- ``step_ms``: forward, backward and ``Adam.step`` as the engine runs them (autograd,
  ``training.optim.build_optimizer``), per optimiser;
- ``update_ms``: ``Adam.step`` alone, per optimiser;
- ``matmul_ms``: the step's matrix products alone (forward, input gradient and weight
  gradient of every layer, ``bmm``), no autograd: the floor a hand-fused step would keep;
- ``max_abs_diff``: the weights after ``STEPS`` steps of each optimiser from the same start.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

SIZES = [784, 1000, 500, 250, 30]
ACTIVATIONS = ["sigmoid", "sigmoid", "sigmoid", "linear"]
P, B = 2, 100
STEPS = 20


def _population(fused: bool) -> tuple[Any, torch.optim.Optimizer]:
    from models.autoencoder import AutoencoderPopulation, random_state
    from training.optim import build_optimizer

    states = [random_state(SIZES, ACTIVATIONS, "tutorial", False,
                           torch.Generator().manual_seed(seed)) for seed in range(P)]
    population = AutoencoderPopulation(states, ACTIVATIONS, "cross_entropy")
    return population, build_optimizer(population.parameters(),
                                       {"name": "adam", "lr": 1e-3, "fused": fused})


def _step(population: Any, opt: torch.optim.Optimizer, x: torch.Tensor,
          bf16: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = population.reconstruction_loss(x, population.decoder_logits(
            population.encode(x)))
    opt.zero_grad(set_to_none=True)
    loss.sum().backward()
    opt.step()


def _matmuls(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    h = x
    for w in weights:
        out = torch.bmm(h, w.transpose(1, 2))  # forward
        torch.bmm(out, w)  # gradient of the input
        torch.bmm(out.transpose(1, 2), h)  # gradient of the weight
        h = out


def _best_ms(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e3


def run(repeats: int = 5, inner: int = 10, log=print) -> dict[str, Any]:
    """Both precisions' rows, keyed ``32-true`` and ``bf16-mixed``."""
    return {name: _run(bf16, repeats, inner, log)
            for name, bf16 in (("32-true", False), ("bf16-mixed", True))}


def _run(bf16: bool, repeats: int, inner: int, log: Any) -> dict[str, Any]:
    x = torch.rand(P, B, SIZES[0], generator=torch.Generator().manual_seed(0))
    nets = {name: _population(fused) for name, fused in (("default", False), ("fused", True))}
    for net in nets.values():  # the same start, then STEPS steps each
        for _ in range(STEPS):
            _step(*net, x, bf16)
    diff = max(float((a - b).abs().max()) for a, b in zip(nets["default"][0].parameters(),
                                                          nets["fused"][0].parameters()))
    shapes = [(P, SIZES[i + 1], SIZES[i]) for i in range(4)]
    weights = [torch.randn(*s) * 0.01 for s in shapes + [(p, i, o) for p, o, i in reversed(shapes)]]
    times: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved; the best of each kept
        for name, (population, opt) in nets.items():
            times.setdefault(f"step_ms_{name}", []).append(
                _best_ms(lambda: _step(population, opt, x, bf16), inner))
            times.setdefault(f"update_ms_{name}", []).append(_best_ms(opt.step, inner))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            times.setdefault("matmul_ms", []).append(
                _best_ms(lambda: _matmuls(x, weights), inner))
    row: dict[str, Any] = {k: round(min(v), 2) for k, v in times.items()}
    row.update({"sizes": SIZES, "population": P, "batch_size": B,
                "threads": torch.get_num_threads(), "max_abs_diff": diff,
                "speedup": round(row["step_ms_default"] / row["step_ms_fused"], 3),
                "matmul_share": round(row["matmul_ms"] / row["step_ms_default"], 3)})
    log(f"  adam, {'bf16-mixed' if bf16 else '32-true'}, hinton2006's shapes, P = {P}, "
        f"batch {B}: step {row['step_ms_default']} ms "
        f"(default Adam) / {row['step_ms_fused']} ms (fused): {row['speedup']}x; the update "
        f"alone {row['update_ms_default']} / {row['update_ms_fused']} ms; the matmuls alone "
        f"{row['matmul_ms']} ms ({100 * row['matmul_share']:.0f} % of the default step); "
        f"after {STEPS} steps max |dW| = {diff:.1e}")
    return row

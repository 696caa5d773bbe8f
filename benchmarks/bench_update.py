"""The bf16-mixed SGD update, eager against ``torch.compile``: what fusing its element-wise
passes would buy (issue 17, item 3).

Under ``bf16-mixed`` a fused step (``training.population``) computes each weight gradient as a
bf16 product and then makes two element-wise passes over the float32 master weights: the
update ``W −= lr·G`` (``descend``) and, at the next step, the weight's bf16 copy
(``compute_copy``). At the ``default`` preset's hidden shape (two members, 1000 × 1000,
batch 20) those passes cost about as much as the gradient's matmul. This part times, at that
shape and in one process:

- ``matmul_ms``: the gradient product alone, ``bmm`` of (P, n, B) × (P, B, n) in bf16;
- ``eager_ms``: the product, the update and the cast, as the engine runs them;
- ``compiled_ms``: the product, then update and cast as one ``torch.compile`` kernel;
- ``compile_s``: the compiled function's first call (tracing and code generation);
- ``max_abs_diff`` / ``equal``: the master weights after ``STEPS`` steps of each, from the
  same start (inductor contracts ``W − lr·G`` into one fused multiply-add, so they may differ
  in the last bit).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

P, N, B = 2, 1000, 20
LR = 0.1
STEPS = 20


def _eager(W: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    W.sub_(G, alpha=lr)  # training.population.descend under autocast
    return W.to(torch.bfloat16)  # the next step's training.population.compute_copy


def _fused(W: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    W.sub_(G.to(W.dtype), alpha=lr)
    return W.to(torch.bfloat16)


def _best_ms(fn: Callable[[], Any], repeats: int, inner: int = 20) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner * 1e3)
    return best


def run(repeats: int = 5, log=print) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(P, N, N, generator=g) * 0.03
    left = (torch.randn(P, N, B, generator=g) * 0.1).to(torch.bfloat16)
    right = (torch.randn(P, B, N, generator=g) * 0.1).to(torch.bfloat16)
    try:
        compiled = torch.compile(_fused, dynamic=False, fullgraph=True)
        t0 = time.perf_counter()
        compiled(W0.clone(), torch.bmm(left, right), LR)
        compile_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - no compiler on this machine: report, go on
        log(f"  update: torch.compile unavailable ({str(exc).splitlines()[0][:120]})")
        compiled, compile_s = None, None

    W_eager, W_comp = W0.clone(), W0.clone()
    for _ in range(STEPS):
        _eager(W_eager, torch.bmm(left, right), LR)
        if compiled is not None:
            compiled(W_comp, torch.bmm(left, right), LR)

    W = W0.clone()
    times = {"matmul_ms": [], "eager_ms": [], "compiled_ms": []}
    for _ in range(repeats):  # interleaved, best of each kept
        times["matmul_ms"].append(_best_ms(lambda: torch.bmm(left, right), 1))
        times["eager_ms"].append(_best_ms(lambda: _eager(W, torch.bmm(left, right), 1e-9), 1))
        if compiled is not None:
            times["compiled_ms"].append(
                _best_ms(lambda: compiled(W, torch.bmm(left, right), 1e-9), 1))
    row: dict[str, Any] = {k: round(min(v), 3) if v else None for k, v in times.items()}
    row.update({"shape": [P, N, N], "batch_size": B, "threads": torch.get_num_threads(),
                "compile_s": round(compile_s, 2) if compile_s is not None else None})
    if compiled is not None:
        row["max_abs_diff"] = float((W_eager - W_comp).abs().max())
        row["equal"] = bool(torch.equal(W_eager, W_comp))
        over = row["compiled_ms"] - row["matmul_ms"], row["eager_ms"] - row["matmul_ms"]
        log(f"  update at ({P}, {N}, {N}), batch {B}: gradient matmul {row['matmul_ms']} ms; "
            f"with update and cast: eager {row['eager_ms']} ms (+{over[1]:.3f}), "
            f"torch.compile {row['compiled_ms']} ms (+{over[0]:.3f}), first call "
            f"{row['compile_s']} s; after {STEPS} steps max |ΔW| = {row['max_abs_diff']:.2e}"
            f"{' (bit-equal)' if row['equal'] else ''}")
    return row

"""Optimiser construction from plain settings (``tasks.config.OptimizerConfig`` dumps)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], settings: Mapping[str, Any]):
    """SGD (momentum and Nesterov optional) or Adam, every hyperparameter from ``settings``.

    Args:
        params: Parameters to optimise.
        settings: Keys ``name``, ``lr``, ``momentum``, ``nesterov``, ``beta1``, ``beta2``,
            ``eps``, ``weight_decay``.
    """
    name = settings["name"]
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings["lr"],
            momentum=settings.get("momentum", 0.0),
            nesterov=settings.get("nesterov", False),
            weight_decay=settings.get("weight_decay", 0.0),
        )
    if name == "adam":
        return torch.optim.Adam(
            params,
            lr=settings["lr"],
            betas=(settings.get("beta1", 0.9), settings.get("beta2", 0.999)),
            eps=settings.get("eps", 1e-8),
            weight_decay=settings.get("weight_decay", 0.0),
        )
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")


#: Hooks that Lightning's ``manual_backward`` and ``LightningOptimizer.step`` call per step.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class ManualSteps:
    """One optimiser step per minibatch for a manually optimised ``LightningModule``,
    without Lightning's per-step machinery where that machinery does nothing.

    ``manual_backward`` and ``LightningOptimizer.step`` pass every step through the
    strategy, the precision plugin, the profiler and the ``on_before_backward`` /
    ``on_after_backward`` / ``on_before_optimizer_step`` hooks: ≈ 0.55 ms of Python per step
    on a 2-core CPU, 9 % of a batch-20 step of the default preset's first layer, and most
    of the 100 µs budget on a GPU. On one device, in ``32-true`` or ``bf16-mixed`` precision
    (no gradient scaler), with the default profiler and no module or callback implementing
    those hooks, all of that reduces to ``loss.backward()`` and ``optimizer.step()``; this
    class then calls just those and advances ``trainer.global_step`` as Lightning does.
    Anything else (several devices, ``16-mixed``, a profiler, a hook someone relies on) takes
    Lightning's own path. Both give bit-identical weights (``tests/test_manual_steps.py``).

    Build it in ``on_train_start`` (the optimisers exist by then).
    """

    #: Off: always Lightning's path (tests and the benchmark compare the two).
    enabled = True

    def __init__(self, module: Any):
        trainer = module.trainer
        self.module = module
        self.lean = self.enabled and _nothing_per_step(trainer, module)
        if self.lean:
            self.optimizer = module.optimizers(use_pl_optimizer=False)
            loop = trainer.fit_loop.epoch_loop.manual_optimization
            self.progress = loop.optim_step_progress  # what trainer.global_step counts
        else:
            self.optimizer = module.optimizers()

    def step(self, loss: torch.Tensor) -> None:
        """``zero_grad``, backward of ``loss``, optimiser step; ``global_step`` + 1."""
        self.optimizer.zero_grad()
        if not self.lean:
            self.module.manual_backward(loss)
            self.optimizer.step()
            return
        loss.backward()
        self.progress.increment_ready()
        self.optimizer.step()
        self.progress.increment_completed()


def _nothing_per_step(trainer: Any, module: Any) -> bool:
    """Whether Lightning's per-step backward and step calls do nothing but backward and step."""
    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.profilers import PassThroughProfiler
    from lightning.pytorch.strategies import SingleDeviceStrategy

    plugin = trainer.strategy.precision_plugin
    plain = type(plugin) is Precision or (type(plugin) is MixedPrecision
                                          and plugin.scaler is None)
    hooks = [(type(cb), Callback) for cb in trainer.callbacks]
    hooks.append((type(module), LightningModule))
    overridden = any(getattr(cls, name) is not getattr(base, name)
                     for cls, base in hooks for name in STEP_HOOKS)
    custom_backward = type(module).backward is not LightningModule.backward
    return (type(trainer.strategy) is SingleDeviceStrategy and plain and not overridden
            and not custom_backward and isinstance(trainer.profiler, PassThroughProfiler)
            and len(trainer.optimizers) == 1)

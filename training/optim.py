"""Optimiser construction from plain settings (``config.stages.OptimizerConfig`` dumps)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], settings: Mapping[str, Any]):
    """SGD (momentum and Nesterov optional) or Adam, every hyperparameter from ``settings``.

    Args:
        params: Parameters to optimise.
        settings: Keys ``name``, ``lr``, ``momentum``, ``nesterov``, ``beta1``, ``beta2``,
            ``eps``, ``weight_decay``, and ``fused`` (``runtime.fused_update``: torch's
            one-kernel update; absent or false: torch's default implementation).
    """
    name = settings["name"]
    fused = {"fused": True} if settings.get("fused") else {}
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings["lr"],
            momentum=settings.get("momentum", 0.0),
            nesterov=settings.get("nesterov", False),
            weight_decay=settings.get("weight_decay", 0.0),
            **fused,
        )
    if name == "adam":
        return torch.optim.Adam(
            params,
            lr=settings["lr"],
            betas=(settings.get("beta1", 0.9), settings.get("beta2", 0.999)),
            eps=settings.get("eps", 1e-8),
            weight_decay=settings.get("weight_decay", 0.0),
            **fused,
        )
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")

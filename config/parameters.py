"""The pipeline flow's parameters, resolved as ``layerwise run`` resolves its options.

A deployment run gets a preset and ``--set``-style overrides (``["data.n_train=1000"]``),
or a complete config (``layerwise config --format json``). A partial config is refused,
naming the missing fields: pydantic would fill them with the class defaults (the
tutorial's batch 1 and 1000 epochs), not with any preset's values.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from pydantic import BaseModel

from config.stages import PipelineConfig, flatten
from runtime.errors import ConfigError

# Filled in from the environment where the flow runs ($LAYERWISE_DATA_DIR on a worker).
HOST_FIELDS = ("data.data_dir",)


def missing_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields that ``model`` got from defaults, not from its input."""
    out = []
    for name in type(model).model_fields:
        key = f"{prefix}{name}"
        value = getattr(model, name)
        if name not in model.model_fields_set:
            if key not in HOST_FIELDS:
                out.append(key)
        elif isinstance(value, BaseModel):
            out += missing_fields(value, f"{key}.")
    return out


def complete(config: PipelineConfig) -> PipelineConfig:
    """The same config with every field marked as given (what a complete JSON config is)."""
    return PipelineConfig.model_validate(config.model_dump())


def preset_differences(config: PipelineConfig, preset: str) -> list[str]:
    """``key=value`` for each field where ``config`` differs from ``preset`` (host fields
    aside), sorted: what a run changed relative to the preset it names."""
    import json

    from config.overrides import resolve_config

    base, own = flatten(resolve_config(preset)), flatten(config)
    return [f"{k}={json.dumps(v)}" for k, v in sorted(own.items())
            if k not in HOST_FIELDS and base.get(k) != v]


def resolve_flow_config(config: Optional[PipelineConfig], preset: Optional[str],
                        overrides: Sequence[str]) -> tuple[PipelineConfig, str, list[str]]:
    """The config a flow run uses, the preset it names and the overrides it records.

    Args:
        config: A complete config, or None to build one from ``preset`` and ``overrides``.
        preset: A preset name (default ``default``); with ``config`` it must be a known
            preset, and the recorded overrides are where ``config`` differs from it.
        overrides: ``section.field=value`` items, as ``--set`` takes them; only without
            ``config``.

    Raises:
        ConfigError: Unknown preset or field, a bad value, a partial config, or both a
            config and overrides.
    """
    from config.overrides import resolve_config

    if config is None:
        preset = preset or "default"
        return resolve_config(preset, sets=list(overrides)), preset, list(overrides)
    if overrides:
        raise ConfigError("give either a complete config or a preset with overrides, not "
                          "both: fold the overrides into the config, or drop the config")
    missing = missing_fields(config)
    if missing:
        raise ConfigError(
            f"the config parameter lacks {', '.join(missing[:6])}"
            f"{f' and {len(missing) - 6} more' if len(missing) > 6 else ''}: its defaults "
            "would be the class defaults, not a preset's. Pass preset and overrides "
            "(section.field=value, as --set) instead, or a complete config from "
            "`layerwise config --format json`")
    preset = preset or "custom"
    if preset == "custom":
        return config, preset, []
    return config, preset, preset_differences(config, preset)

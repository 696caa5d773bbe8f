"""The ablation grid's file format: the validated models of a grid YAML (``Grid`` and its
parts) and of one expanded cell (``Cell``); ``config.grid`` loads and expands them.

A grid file looks like this (``config/grids/*.yaml`` are complete examples)::

    name: tiny
    base:                      # what every cell starts from
      preset: quick            # a pipeline preset (config/presets.py), optional
      overrides:               # PipelineConfig sections, as in a --config YAML
        data: {n_train: 2000}
    factors:                   # each over a list of values; the cells are their product
      depth: [1, 2]
      init: [pretrained, tutorial]
      seeds: [0, 1, 2]
    retries: 1

How a factor value reaches the cell's config:

| factor | sets |
| --- | --- |
| ``variant`` | named bundles of overrides (``{name, overrides}``), applied after ``base`` |
| ``objective`` | ``objective``: ``classify`` (test error, a fraction) or ``reconstruct`` (the deep autoencoder: test squared error per image) |
| ``depth`` | ``model.hidden_sizes = [width] * depth`` (width: the factor, else the base's first layer) |
| ``width`` | ``model.hidden_sizes = [width] * depth`` (depth: the factor, else the base's) |
| ``noise`` | ``pretrain.noise`` |
| ``corruption_level`` | ``pretrain.corruption_levels = [level] * depth`` |
| ``n_train`` | ``data.n_train`` |
| ``activation`` | ``model.activation`` |
| ``init`` | ``pretrained``: the pretrained arm (its autoencoders start from ``model.init``); ``tutorial``, ``xavier`` or ``he``: the random-init arm with that scheme; ``random``: the random-init arm with the cell's own ``model.init`` |
| ``seeds`` | ``runtime.seed`` (initialisation, noise and data order; the two arms of a seed share the data order) |

Without a ``corruption_level`` factor, a depth-d cell takes the base's first d levels, the
last one repeated when the base has fewer.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.corruption import check_level
from config.autoencoder import Objective
from config.stages import Activation, InitScheme, NoiseType, PipelineConfig

RANDOM_SCHEMES = get_args(InitScheme)  # the config's init schemes, declared there only
InitValue = Literal[("pretrained", "random", *RANDOM_SCHEMES)]
#: Columns of the results table that describe a cell, in order (``variant`` only when used).
FACTOR_COLUMNS = ("variant", "objective", "depth", "width", "noise", "corruption_level", "n_train",
                  "activation", "init", "seed")
#: The factors a summary groups by: everything but the seed and the init it compares.
GROUPING = tuple(c for c in FACTOR_COLUMNS if c not in ("init", "seed"))



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Base(_Strict):
    """Where every cell starts: a pipeline preset, then overrides of its sections."""

    preset: Optional[str] = Field(None, description="A pipeline preset (config/presets.py).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="PipelineConfig sections, as in a --config YAML."
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: Optional[str]) -> Optional[str]:
        from config.presets import PRESETS

        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown pipeline preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v


class Variant(_Strict):
    """A named bundle of overrides, e.g. ``relu-he``: ReLU, He init, squared-error loss."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.+-]+$", description="Label of the variant.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Config sections.")


class Factors(_Strict):
    """The factors of the ablation; each one, when given, is a non-empty list of values."""

    variant: Optional[list[Variant]] = Field(None, min_length=1)
    objective: Optional[list[Objective]] = Field(None, min_length=1)
    depth: Optional[list[int]] = Field(None, min_length=1, description="Hidden layers.")
    width: Optional[list[int]] = Field(None, min_length=1, description="Units per layer.")
    noise: Optional[list[NoiseType]] = Field(None, min_length=1)
    corruption_level: Optional[list[float]] = Field(None, min_length=1)
    n_train: Optional[list[int]] = Field(None, min_length=1)
    activation: Optional[list[Activation]] = Field(None, min_length=1)
    init: list[InitValue] = Field(["pretrained", "random"], min_length=1)
    seeds: list[int] = Field([0], min_length=1)

    @field_validator("*")
    @classmethod
    def _unique(cls, v: Optional[list[Any]]) -> Optional[list[Any]]:
        if v is not None:
            seen = [x.name if isinstance(x, Variant) else x for x in v]
            dupes = sorted({str(x) for x in seen if seen.count(x) > 1})
            if dupes:
                raise ValueError(f"repeated value(s) {', '.join(dupes)}")
        return v

    @field_validator("depth", "width", "n_train")
    @classmethod
    def _positive(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and any(x < 1 for x in v):
            raise ValueError("values must be at least 1")
        return v

    @field_validator("seeds")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError("seeds must be at least 0")
        return v

    @field_validator("corruption_level")
    @classmethod
    def _levels(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        for i, level in enumerate(v or []):
            check_level(level, f"corruption_level[{i}]")
        return v

    def listed(self) -> list[str]:
        """Factor columns this grid names (cell ids and summaries use these)."""
        names = [n for n in FACTOR_COLUMNS if n not in ("init", "seed")
                 and getattr(self, n) is not None]
        return names + ["init", "seed"]


class Bootstrap(_Strict):
    """Percentile-bootstrap settings of the summary."""

    resamples: int = Field(10_000, ge=100, description="Bootstrap resamples.")
    level: float = Field(0.95, gt=0, lt=1, description="Confidence level.")
    seed: int = Field(0, ge=0, description="Seed of the resampling.")


class Grid(_Strict):
    """A whole ablation: base config, factors, retries and statistics settings."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: Base = Field(default_factory=Base)
    factors: Factors
    retries: int = Field(0, ge=0, description="Retries of a failed cell before it is recorded.")
    retry_delay_seconds: float = Field(0.0, ge=0)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    select_on_validation: Optional[str] = Field(
        None, description="A listed factor (e.g. corruption_level) chosen per group on the "
        "pretrained arm's mean validation error; the report adds both arms' test errors at "
        "the chosen value (reports/selection.py).")

    @model_validator(mode="after")
    def _selectable(self) -> "Grid":
        factor = self.select_on_validation
        if factor is not None and factor not in self.factors.listed()[:-2]:
            raise ValueError(f"select_on_validation: {factor!r} is not a factor of this grid "
                             f"(choose one of {', '.join(self.factors.listed()[:-2]) or 'none'})")
        return self


class Cell(BaseModel):
    """One run of the ablation: a validated config, an arm and the factor values it came from."""

    model_config = ConfigDict(frozen=True)

    id: str
    arm: Literal["pretrained", "random"]
    factors: dict[str, Any]
    config: PipelineConfig

"""The ablation grid: a validated YAML spec of factors, expanded into one cell (one
``PipelineConfig`` and one arm) per combination of factor values.

A grid file looks like this (``flows/grids/*.yaml`` are complete examples)::

    name: tiny
    base:                      # what every cell starts from
      preset: quick            # a pipeline preset (flows/presets.py), optional
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

import itertools
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows.overrides import merge
from models.corruption import check_level
from tasks.config import Activation, InitScheme, NoiseType, PipelineConfig, default_data_dir
from tasks.errors import ConfigError

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
RANDOM_SCHEMES = get_args(InitScheme)  # the config's init schemes, declared there only
InitValue = Literal[("pretrained", "random", *RANDOM_SCHEMES)]
#: Columns of the results table that describe a cell, in order (``variant`` only when used).
FACTOR_COLUMNS = ("variant", "depth", "width", "noise", "corruption_level", "n_train",
                  "activation", "init", "seed")
#: The factors a summary groups by: everything but the seed and the init it compares.
GROUPING = tuple(c for c in FACTOR_COLUMNS if c not in ("init", "seed"))
MAX_ERRORS_SHOWN = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Base(_Strict):
    """Where every cell starts: a pipeline preset, then overrides of its sections."""

    preset: Optional[str] = Field(None, description="A pipeline preset (flows/presets.py).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="PipelineConfig sections, as in a --config YAML."
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: Optional[str]) -> Optional[str]:
        from flows.presets import PRESETS

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


class Cell(BaseModel):
    """One run of the ablation: a validated config, an arm and the factor values it came from."""

    model_config = ConfigDict(frozen=True)

    id: str
    arm: Literal["pretrained", "random"]
    factors: dict[str, Any]
    config: PipelineConfig


# --- loading -------------------------------------------------------------------------------


def grid_presets() -> list[str]:
    """Names of the shipped grids (``flows/grids/<name>.yaml``)."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if name not in grid_presets():
        raise ConfigError(f"unknown ablation preset {name!r}; choose one of "
                          f"{', '.join(grid_presets())} (or pass --grid FILE.yaml)")
    return GRIDS_DIR / f"{name}.yaml"


def load_grid(path: Path) -> Grid:
    """Read and validate a grid YAML; a ``ConfigError`` names every bad field."""
    import yaml

    from flows.overrides import format_validation_error

    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"grid {path}: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"grid {path}: expected a mapping with name, base and factors")
    try:
        return Grid.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"grid {path}: " + format_validation_error(exc)) from None


def customise(grid: Grid, seeds: Optional[int] = None, dataset: Optional[str] = None,
              data_dir: Optional[Path] = None) -> Grid:
    """The CLI's overrides: ``--seeds N`` (seeds 0..N-1), ``--dataset``, ``--data-dir``."""
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1 seed")
    overrides = dict(grid.base.overrides)
    data = dict(overrides.get("data") or {})
    if dataset is not None:
        data["dataset"] = dataset
    if data_dir is not None:
        data["data_dir"] = str(Path(data_dir).resolve())
    overrides["data"] = data
    factors = grid.factors.model_copy(update={"seeds": list(range(seeds))} if seeds else {})
    base = grid.base.model_copy(update={"overrides": overrides})
    return grid.model_copy(update={"base": base, "factors": factors})


# --- expansion -----------------------------------------------------------------------------


def _cell_tree(tree: dict[str, Any], values: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Apply one combination of factor values to a config tree; returns (tree, arm)."""
    import copy

    tree = copy.deepcopy(tree)
    model, pretrain = tree.setdefault("model", {}), tree.setdefault("pretrain", {})
    sizes = list(model.get("hidden_sizes") or [1000, 1000, 1000])
    depth = values.get("depth", len(sizes))
    if "depth" in values or "width" in values:
        sizes = [values.get("width", sizes[0])] * depth
    model["hidden_sizes"] = sizes
    if "corruption_level" in values:
        pretrain["corruption_levels"] = [values["corruption_level"]] * len(sizes)
    else:
        levels = list(pretrain.get("corruption_levels") or [0.1, 0.2, 0.3])
        pretrain["corruption_levels"] = (levels + [levels[-1]] * len(sizes))[: len(sizes)]
    if "noise" in values:
        pretrain["noise"] = values["noise"]
    if "activation" in values:
        model["activation"] = values["activation"]
    if "n_train" in values:
        tree.setdefault("data", {})["n_train"] = values["n_train"]
    init = values["init"]
    if init in RANDOM_SCHEMES:
        model["init"] = init
    tree.setdefault("runtime", {})["seed"] = values["seed"]
    return tree, "pretrained" if init == "pretrained" else "random"


def describe(config: PipelineConfig, arm: str, variant: Optional[str]) -> dict[str, Any]:
    """The factor columns of a cell, read back from its resolved config."""
    sizes, levels = config.model.hidden_sizes, config.pretrain.corruption_levels
    row = {"variant": variant} if variant is not None else {}
    return row | {
        "depth": len(sizes),
        "width": sizes[0] if len(set(sizes)) == 1 else None,
        "noise": config.pretrain.noise,
        "corruption_level": levels[0] if len(set(levels)) == 1 else None,
        "n_train": config.data.n_train,
        "activation": config.model.activation,
        "init": "pretrained" if arm == "pretrained" else config.model.init,
        "seed": config.runtime.seed,
    }


def expand(grid: Grid) -> list[Cell]:
    """Every cell of the grid, each with a validated ``PipelineConfig``.

    Raises:
        ConfigError: before any work, naming each invalid cell (grouped by message) and
            any two factor combinations that give the same cell.
    """
    from flows.overrides import check_npz, format_validation_error
    from flows.presets import preset as load_preset

    tree = load_preset(grid.base.preset) if grid.base.preset else {}
    tree = merge(tree, grid.base.overrides)
    data = tree.setdefault("data", {})
    # Workers in other processes (or machines) get the data root explicitly, never via env.
    data["data_dir"] = str(Path(data.get("data_dir") or default_data_dir()).resolve())
    if str(data.get("dataset", "mnist")).lower() != "mnist":
        data["dataset"] = str(Path(data["dataset"]).resolve())
    f = grid.factors
    names = [n for n in f.listed() if n != "variant"]
    axes = [(f.seeds if n == "seed" else getattr(f, n)) for n in names]
    variants = f.variant or [None]
    cells, problems, seen, npz_checked = [], {}, {}, set()
    for variant in variants:
        vtree = merge(tree, variant.overrides) if variant else tree
        for combo in itertools.product(*axes):
            values = dict(zip(names, combo))
            cell_id = ",".join(
                ([f"variant={variant.name}"] if variant else [])
                + [f"{k}={v}" for k, v in values.items()])
            ctree, arm = _cell_tree(vtree, values)
            try:
                config = PipelineConfig.model_validate(ctree)
                if not config.data.is_mnist and (key := (config.data, config.pretrain.batch_size,
                                                         config.finetune.batch_size)) \
                        not in npz_checked:
                    npz_checked.add(key)
                    check_npz(config)
            except ValidationError as exc:
                msg = format_validation_error(exc).removeprefix("invalid configuration:\n")
                problems.setdefault(msg.strip(), []).append(cell_id)
                continue
            except ConfigError as exc:
                problems.setdefault(str(exc), []).append(cell_id)
                continue
            identity = (config.digest(), arm)
            if identity in seen:
                raise ConfigError(f"grid {grid.name}: cells {seen[identity]} and {cell_id} are "
                                  "the same run (e.g. init 'random' and the base's scheme both "
                                  "listed); drop one of the values")
            seen[identity] = cell_id
            cells.append(Cell(id=cell_id, arm=arm, config=config,
                              factors=describe(config, arm, variant.name if variant else None)))
    if problems:
        n_bad = sum(len(v) for v in problems.values())
        lines = [f"invalid grid {grid.name}: {n_bad} of {n_bad + len(cells)} cells give an "
                 "invalid PipelineConfig"]
        for msg, ids in list(problems.items())[:MAX_ERRORS_SHOWN]:
            more = f" (and {len(ids) - 1} more cells)" if len(ids) > 1 else ""
            lines.append(f"  cell {ids[0]}{more}: {msg}")
        raise ConfigError("\n".join(lines))
    return cells


def grid_params(grid: Grid) -> dict[str, Any]:
    """The grid flattened into MLflow params (``grid.factors.depth`` = ``[1, 2]``, ...)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    walk("grid", grid.model_dump(mode="json", exclude_none=True))
    return out

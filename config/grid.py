"""The ablation grid: a grid YAML (its format: ``config.grid_spec``) loaded, validated and
expanded into one cell (one ``PipelineConfig`` and one arm) per combination of factor values.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from config.grid_spec import RANDOM_SCHEMES, Cell, Grid
from config.overrides import merge
from config.stages import NAMED_DATASETS, PipelineConfig, default_data_dir
from runtime.errors import ConfigError

GRIDS_DIR = Path(__file__).resolve().parent / "grids"
MAX_ERRORS_SHOWN = 5


# --- loading -------------------------------------------------------------------------------


def grid_presets() -> list[str]:
    """Names of the shipped grids (``config/grids/<name>.yaml``)."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if name not in grid_presets():
        raise ConfigError(f"unknown ablation preset {name!r}; choose one of "
                          f"{', '.join(grid_presets())} (or pass --grid FILE.yaml)")
    return GRIDS_DIR / f"{name}.yaml"


def load_grid(path: Path) -> Grid:
    """Read and validate a grid YAML; a ``ConfigError`` names every bad field."""
    import yaml

    from config.overrides import format_validation_error

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
    if "objective" in values:
        tree["objective"] = values["objective"]
    init = values["init"]
    if init in RANDOM_SCHEMES:
        model["init"] = init
    tree.setdefault("runtime", {})["seed"] = values["seed"]
    return tree, "pretrained" if init == "pretrained" else "random"


def describe(config: PipelineConfig, arm: str, variant: Optional[str],
             objective: bool = False) -> dict[str, Any]:
    """The factor columns of a cell, read back from its resolved config (``objective``:
    with the objective column, for grids that reconstruct)."""
    sizes, levels = config.model.hidden_sizes, config.pretrain.corruption_levels
    row = {"variant": variant} if variant is not None else {}
    if objective:
        row["objective"] = config.objective
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
    from config.overrides import check_npz, format_validation_error
    from config.presets import preset as load_preset

    tree = load_preset(grid.base.preset) if grid.base.preset else {}
    tree = merge(tree, grid.base.overrides)
    data = tree.setdefault("data", {})
    # Workers in other processes (or machines) get the data root explicitly, never via env.
    data["data_dir"] = str(Path(data.get("data_dir") or default_data_dir()).resolve())
    if str(data.get("dataset", "mnist")).lower() not in NAMED_DATASETS:
        data["dataset"] = str(Path(data["dataset"]).resolve())
    f = grid.factors
    names = [n for n in f.listed() if n != "variant"]
    axes = [(f.seeds if n == "seed" else getattr(f, n)) for n in names]
    variants = f.variant or [None]
    # Any reconstruct cell: every row names its objective (its error is in other units).
    with_objective = f.objective is not None or tree.get("objective") == "reconstruct" or any(
        (v.overrides.get("objective") == "reconstruct") for v in variants if v)
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
                if not config.data.is_named and (key := (config.data, config.pretrain.batch_size,
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
                              factors=describe(config, arm, variant.name if variant else None,
                                               with_objective)))
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

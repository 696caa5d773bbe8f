"""Resolve a preset, a YAML file and ``--set section.field=value`` overrides into one
validated ``PipelineConfig``, or a ``ConfigError`` that names the field, value and range."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from config.stages import PipelineConfig
from runtime.errors import ConfigError


def known_keys(model: type = PipelineConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. ``pretrain.optimizer.lr``."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_set(item: str) -> tuple[str, Any]:
    """``"pretrain.corruption_levels=[0.1,0.2]"`` -> ``("pretrain.corruption_levels", [0.1, 0.2])``.
    Values are parsed as YAML, so lists, numbers, booleans and ``null`` work."""
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    if key not in known_keys():
        close = [k for k in known_keys() if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--set {key}: unknown key.{hint} Run `layerwise config --keys`.")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[leaf] = value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update: sections merge, leaves (lists included) are replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config(
    preset: str = "default",
    config_file: Optional[Path] = None,
    sets: Sequence[str] = (),
    dataset: Optional[str] = None,
    data_dir: Optional[Path] = None,
    seed: Optional[int] = None,
    file_sizes: bool = True,
) -> PipelineConfig:
    """Preset, then the YAML file, then ``--set`` items, then the dedicated flags.

    A preset's ``data.n_train`` means "at most": on a file with fewer training rows it
    becomes null (all of them). A value the user gives is checked, not changed. Every
    size rule is checked from the data file's header (:func:`check_sizes`), unless
    ``file_sizes`` is False: the preflight then reports them with the file's other problems.
    """
    import yaml
    from pydantic import ValidationError

    from config.presets import PRESETS, preset as load_preset

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tree = load_preset(preset)
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--config {config_file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of sections")
        tree = merge(tree, loaded)
        user_n_train = "n_train" in (loaded.get("data") or {})
    else:
        user_n_train = False
    for item in sets:
        key, value = parse_set(item)
        user_n_train |= key == "data.n_train"
        _assign(tree, key, value)
    for key, value in (("data.dataset", dataset), ("data.data_dir", data_dir),
                       ("runtime.seed", seed)):
        if value is not None:
            _assign(tree, key, str(value) if isinstance(value, Path) else value)
    try:
        config = PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if not config.data.is_named:
        n_train = config.data.n_train
        if not user_n_train and n_train is not None and n_train > file_plan(config).n_fit:
            _assign(tree, "data.n_train", None)  # the preset's "at most": all rows
            config = PipelineConfig.model_validate(tree)
        if file_sizes:
            check_sizes(config)
    return config


def file_plan(config: PipelineConfig):
    """The :class:`config.sizes.SplitPlan` of a data file, from its header only
    (``sources.headers``)."""
    from config.sizes import plan_split
    from sources.headers import file_sizes

    return plan_split(config.data, *file_sizes(config.data))


def check_sizes(config: PipelineConfig) -> None:
    """Every size rule (n_valid, n_train, batch sizes) against a data file's header.

    Raises:
        ConfigError: listing all problems together, each with a value that works.
    """
    problems = size_problems_of(config)
    if problems:
        raise ConfigError(f"the settings do not fit {config.data.dataset}:\n  "
                          + "\n  ".join(problems))


def size_problems_of(config: PipelineConfig) -> list[str]:
    """Every size rule (n_valid, n_train, batch sizes) the config breaks on its data file,
    read from the file's header ([] for a named dataset: checked when validated)."""
    from config.stages import batch_sizes
    from config.sizes import size_problems

    if config.data.is_named:
        return []
    return size_problems(config.data, file_plan(config), batch_sizes(config))


#: The name the ablation grid calls (it checks each distinct data config once).
check_npz = check_sizes


def format_validation_error(exc: Any) -> str:
    """One line per invalid field: ``pretrain.epochs = 0: Input should be >= 1``."""
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}{shown}: {msg}")
    return "\n".join(lines)

"""The data stage: read a source (``sources.read``), split, normalise, digest.

Plain functions first (testable without Prefect), the Prefect task last. The validation
split follows ``config.sizes`` (MNIST: the LAST 10,000 of the official 60k, as in the
reference tutorial; test = the official 10k). Normalisation statistics come from the
training split only, after any ``n_train`` subset.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from config.sizes import plan_split, size_problems
from config.stages import DataConfig, PipelineConfig
from runtime.console import announce
from runtime.errors import DataError
from sources.labels import class_set_text, label_warnings
from sources.read import read_source, source_location
from sources.sampling import stratified_subset

SPLITS = ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test")
#: Test rows kept, as the source stores them, for the registered model's input example.
N_EXAMPLE = 5


def normalize(
    x_train: np.ndarray, x_valid: np.ndarray, x_test: np.ndarray, method: str, zca_epsilon: float
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Normalise three (N, D) splits with statistics from ``x_train`` only.

    - ``unit``: uint8 -> x / 255. Any other dtype is min-max scaled by the training split's
      global min and max; valid and test are then clipped to [0, 1]. Stats ``low``, ``high``.
    - ``standardize``: (x - mean) / std per feature; constant features (many MNIST border
      pixels) get std 1, so they map to 0 instead of NaN. Stats ``mean``, ``std`` (D,).
    - ``zca``: scale as ``unit``, centre on the training mean, multiply by
      W = U diag(1 / sqrt(S + eps)) U^T, where U S U^T is the training covariance (1/(N-1)),
      eigendecomposed in float64. Stats ``mean`` (D,), ``zca_matrix`` (D, D), ``low``, ``high``.

    Returns:
        [x_train, x_valid, x_test] as float32 (N, D), and the stats as float64 arrays.

    Raises:
        DataError: when a statistic is not finite in float32, the precision that the
            registered model (``models.served.RawPixels``) applies them in.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked, not warned
        xs, stats = _normalize(x_train, x_valid, x_test, method, zca_epsilon)
        bad = [k for k, v in stats.items()
               if not np.isfinite(np.asarray(v, dtype=np.float64).astype(np.float32)).all()]
    if bad:
        raise DataError(f"the {method!r} normalisation statistics {', '.join(bad)} of the "
                        "training split overflow float32 (features beyond ±3.4e38, or their "
                        "squares in float64): rescale the features before saving them")
    return xs, stats


def _normalize(x_train: np.ndarray, x_valid: np.ndarray, x_test: np.ndarray, method: str,
               zca_epsilon: float) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """:func:`normalize` without the check of its statistics."""
    splits = (x_train, x_valid, x_test)
    if method == "standardize":
        mean = x_train.mean(axis=0, dtype=np.float64)  # (D,)
        std = x_train.std(axis=0, dtype=np.float64)  # (D,)
        std[(std == 0) | (x_train.max(axis=0) == x_train.min(axis=0))] = 1.0
        ft = np.float32 if x_train.dtype.itemsize <= 2 else np.float64  # uint8: float32 is exact
        m, inv = mean.astype(ft), (1.0 / std).astype(ft)
        return [((x.astype(ft) - m) * inv).astype(np.float32) for x in splits], {
            "mean": mean, "std": std}  # fmt: skip
    if method not in ("unit", "zca"):
        raise DataError(f"unknown normalization {method!r}; use 'unit', 'standardize' or 'zca'")
    if x_train.dtype == np.uint8:
        low, high = 0.0, 255.0
        xs = [x.astype(np.float32) / np.float32(255) for x in splits]  # exact rounding
    else:
        low, high = float(x_train.min()), float(x_train.max())
        xs = [(x.astype(np.float64) - low) / ((high - low) or 1.0) for x in splits]
        xs = [(x if i == 0 else np.clip(x, 0.0, 1.0)).astype(np.float32) for i, x in enumerate(xs)]
    stats = {"low": np.float64(low), "high": np.float64(high)}
    if method == "unit":
        return xs, stats
    xc = xs[0].astype(np.float64)  # (N, D)
    mean = xc.mean(axis=0)  # (D,)
    xc -= mean
    cov = xc.T @ xc / max(len(xc) - 1, 1)  # (D, D)
    s, u = np.linalg.eigh(cov)  # tiny negative eigenvalues are round-off: clip them
    w = (u / np.sqrt(np.clip(s, 0.0, None) + zca_epsilon)) @ u.T  # (D, D), symmetric
    w32, m32 = w.astype(np.float32), mean.astype(np.float32)
    xs = [(x - m32) @ w32 for x in xs]  # (N, D) @ (D, D) -> (N, D); float32 halves the time
    return xs, {**stats, "mean": mean, "zca_matrix": w}


def data_digest(splits: dict[str, np.ndarray], settings: dict) -> str:
    """SHA-256 over the raw split arrays (dtype, shape, little-endian C-order bytes, in
    :data:`SPLITS` order) and the canonical JSON of ``settings``. No hash(), no pickle."""
    h = hashlib.sha256(b"layerwise-data-v1\n")
    for name in SPLITS:
        a = np.ascontiguousarray(splits[name])
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode() + b"\n")
        h.update(memoryview(a).cast("B"))
    h.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class DataBundle:
    """The data stage's output: float32 (N, D) / int64 (N,) CPU tensors and their provenance,
    with what later stages need from the source, so that none of them reads it again."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_features: int
    n_classes: int
    image_shape: Optional[tuple[int, int]]
    source: str
    normalization: str
    norm_stats: dict[str, torch.Tensor]
    digest: str
    location: str  # where the data lies, as MLflow's dataset inputs name it
    input_example: np.ndarray  # (5, D): the first test rows as stored; the model's example
    pixels: bool  # the source stores 8-bit pixels (uint8): the served model expects 0-255
    zca_epsilon: Optional[float] = None  # set only when normalization == "zca"

    def summary(self) -> dict:
        """JSON-friendly description for logging, with per-split class counts."""
        ys = {"train": self.y_train, "valid": self.y_valid, "test": self.y_test}
        out = {"source": self.source, **{f"n_{k}": len(y) for k, y in ys.items()}}
        out |= {"n_features": self.n_features, "n_classes": self.n_classes,
                "classes": class_set_text(torch.cat(list(ys.values())).numpy())}
        out |= {"normalization": self.normalization, "digest": self.digest}
        if self.normalization == "zca":
            out["zca_epsilon"] = self.zca_epsilon
        for k, y in ys.items():  # (n_classes,) examples per class
            out[f"class_counts_{k}"] = torch.bincount(y, minlength=self.n_classes).tolist()
        return out


def split_pool(cfg: DataConfig, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Training and validation splits of the pool, as ``config.sizes`` plans them.

    Returns:
        The six :data:`SPLITS` arrays, and the split's settings for the digest.

    Raises:
        DataError: naming every size rule the config breaks and its fix.
    """
    x_pool, y_pool = arrays["x_pool"], arrays["y_pool"]
    plan = plan_split(cfg, len(x_pool), len(arrays["x_valid"]) if "x_valid" in arrays else None)
    problems = size_problems(cfg, plan)
    if problems:
        raise DataError("; ".join(problems))
    settings = {"n_valid": plan.n_valid}
    if plan.valid_from == "file":
        settings["valid_split"] = "file"
        x_tr, y_tr, x_va, y_va = x_pool, y_pool, arrays["x_valid"], arrays["y_valid"]
    elif plan.valid_from == "stratified":
        settings |= {"valid_split": "stratified", "valid_seed": cfg.subset_seed}
        valid = stratified_subset(y_pool, plan.n_valid, seed=cfg.subset_seed)
        train = np.setdiff1d(np.arange(len(y_pool)), valid)  # sorted: file order kept
        x_tr, y_tr, x_va, y_va = x_pool[train], y_pool[train], x_pool[valid], y_pool[valid]
    else:  # the last n_valid rows of the pool: (n_fit, D) / (n_valid, D)
        n_fit = plan.n_fit
        x_tr, y_tr, x_va, y_va = x_pool[:n_fit], y_pool[:n_fit], x_pool[n_fit:], y_pool[n_fit:]
    raw = {"x_train": x_tr, "y_train": y_tr, "x_valid": x_va, "y_valid": y_va,
           "x_test": arrays["x_test"], "y_test": arrays["y_test"]}  # fmt: skip
    return raw, settings


def load_data(cfg: DataConfig) -> DataBundle:
    """Load, verify, split, subset, digest and normalise the data that ``cfg`` describes.

    Raises:
        DataError: on missing or corrupt files, malformed arrays, or splits that do not fit.
    """
    arrays, source_settings = read_source(cfg)
    raw, split_settings = split_pool(cfg, arrays)
    n_features = int(raw["x_train"].shape[1])
    side = math.isqrt(n_features)
    image_shape = (side, side) if side * side == n_features else None
    # MNIST's settings keep their original keys, so its digests are unchanged.
    settings = {"normalization": cfg.normalization, "n_train": cfg.n_train,
                **split_settings, **source_settings}  # fmt: skip
    if cfg.n_train is not None:
        idx = stratified_subset(raw["y_train"], cfg.n_train, cfg.subset_seed)
        raw["x_train"], raw["y_train"] = raw["x_train"][idx], raw["y_train"][idx]
        settings["subset_seed"] = cfg.subset_seed  # the seed matters only with a subset
    if cfg.normalization == "zca":
        settings["zca_epsilon"] = cfg.zca_epsilon
    xs, stats = normalize(raw["x_train"], raw["x_valid"], raw["x_test"], cfg.normalization,
                          cfg.zca_epsilon)  # fmt: skip
    tensors = dict(zip(("x_train", "x_valid", "x_test"), map(torch.from_numpy, xs)))
    for name in ("y_train", "y_valid", "y_test"):
        tensors[name] = torch.from_numpy(np.ascontiguousarray(raw[name]))
    y_all = (arrays["y_pool"], raw["y_valid"], raw["y_test"])
    for warning in label_warnings({"y_train": y_all[0], "y_valid": y_all[1],
                                   "y_test": y_all[2]}, cfg.dataset):
        announce(f"warning: {warning}")
    return DataBundle(
        **tensors,
        n_features=n_features,
        n_classes=int(max(y.max() for y in y_all)) + 1,
        image_shape=image_shape,
        source=cfg.dataset,
        normalization=cfg.normalization,
        norm_stats={k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in stats.items()},
        digest=data_digest(raw, settings),
        location=source_location(cfg),
        input_example=raw["x_test"][:N_EXAMPLE].copy(),  # a copy: not a view of the split
        pixels=raw["x_test"].dtype == np.uint8,
        zca_epsilon=cfg.zca_epsilon if cfg.normalization == "zca" else None,
    )


@task(name="load-data", task_run_name="load-data", cache_policy=NO_CACHE, persist_result=False)
def load_data_task(cfg: DataConfig) -> DataBundle:
    """Prefect task over :func:`load_data`; never cached (tensors do not hash stably)."""
    return load_data(cfg)


def check_sizes(config: PipelineConfig, data: DataBundle) -> None:
    """``ConfigError`` when ``data.n_train`` or a stage's batch size exceeds the training
    split that was loaded (``config.stages.check_train_size``)."""
    from config.stages import check_train_size
    from runtime.errors import ConfigError

    try:
        check_train_size(config, len(data.x_train) if config.data.n_train is None
                         else config.data.n_train)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

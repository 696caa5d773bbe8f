"""Figures for the evaluate stage: filters, image grids, learning curves, confusion matrices.

Plain functions, numpy arrays (or torch tensors) in, PNG/CSV files out; matplotlib is imported
lazily on the Agg backend. Every writer is atomic: a killed run leaves no half-written file.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

# squarest_shape and tile_raster_images are re-exported: callers import them from here
from reports.image_grid import row_strip, squarest_shape, tile_raster_images  # noqa: F401


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view of ``x``; a torch tensor is detached and moved to the CPU (no torch import)."""
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def _atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write_fn`` fills a temporary file, then it replaces ``path``.

    The temporary file sits in the target's directory (``os.replace`` is atomic only within one
    filesystem). If ``write_fn`` raises, it is removed and ``path`` is left as it was.

    Args:
        path: The file to create or replace; missing parent directories are created.
        write_fn: Called with the temporary path; must write the whole file there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported lazily: workers have no display."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is first imported
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out ``fig`` (unless it has a layout engine) and write it atomically as a 100-dpi PNG."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def save_filters(
    weights: np.ndarray,
    path: str | os.PathLike,
    img_shape: tuple[int, int] = (28, 28),
    n: int = 100,
    title: Optional[str] = None,
) -> Path:
    """Save the first ``n`` filters (rows of W) as one titled, tiled figure with a scale.

    The tutorial's ``filters_corruption_30.png`` layout (100 filters of 28x28 tiled 10x10),
    drawn about 3x larger (a tile is about 80 px), with 2-pixel white spacing, one shared
    symmetric grey scale (black negative, white positive, clipped at the 99th percentile
    of |W| so one large weight does not wash out the rest) and its colour bar.

    Args:
        weights: (n_hidden, n_visible) encoder weights; row j is hidden unit j's filter.
        path: Target ``.png``.
        img_shape: (H, W) with H*W == n_visible.
        n: How many filters to show (at most n_hidden), tiled ceil(sqrt n) x ceil(sqrt n).
        title: The figure's title, e.g. layer, epochs and noise.

    Returns:
        The path written.
    """
    W, D = _to_numpy(weights).astype(np.float64), img_shape[0] * img_shape[1]
    if W.ndim != 2 or W.shape[1] != D:
        raise ValueError(f"n_visible = {W.shape[-1]} (weights {W.shape}) but img_shape "
                         f"{tuple(img_shape)} has {D} pixels; pass the matching img_shape")
    n = min(n, W.shape[0])
    side = max(1, math.ceil(math.sqrt(n)))  # 100 -> 10x10 tiles
    (h, w), gap = img_shape, 2
    raster = np.full((side * (h + gap) - gap, side * (w + gap) - gap), np.nan)  # NaN: spacing
    for j in range(n):
        r, c = divmod(j, side)
        raster[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = \
            W[j].reshape(h, w)
    scale = float(np.percentile(np.abs(W[:n]), 99)) or 1.0
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 9.4))
    try:
        image = ax.imshow(raster, cmap=plt.get_cmap("gray").with_extremes(bad="white"),
                          vmin=-scale, vmax=scale, interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.set_title(title or f"{n} filters", fontsize=13)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, extend="both")
        bar.set_label("weight (one scale for all filters; clipped at the 99th percentile)")
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def save_image_rows(
    rows: Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    img_shape: tuple[int, int] = (28, 28),
    caption: Optional[str] = None,
) -> Path:
    """Save a grid with one labelled row of images per entry, e.g. original/corrupted/recon.

    Args:
        rows: (label, X) pairs; X is (n, D), shown as n grayscale images. If D != H*W
            (hidden codes), vectors are shown as squarest_shape(D), labelled "(codes)".
        path: Target ``.png``.
        img_shape: (H, W) of an input image.
        caption: A line under the rows saying what they show (adds half an inch).

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("rows is empty: pass at least one (label, X) pair")
    arrays = [_to_numpy(X).reshape(len(X), -1) for _, X in rows]  # (n, D) each
    n_cols, plt = max(max(len(X) for X in arrays), 1), _pyplot()
    # One axes per row showing the row's images side by side (one imshow, not one axes per
    # image: a grid of 40 axes took ≈ 1 s to lay out and draw, a row strip ≈ 0.05 s).
    fig, axes = plt.subplots(len(rows), 1, figsize=(n_cols + 1.5, len(rows) + 0.5 * bool(caption)),
                             squeeze=False)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9, wrap=True)
        fig.set_layout_engine("tight", rect=(0, 0.5 / (len(rows) + 0.5), 1, 1))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    try:
        for ax, (label, _), X in zip(axes[:, 0], rows, arrays):
            shape = tuple(img_shape)
            if X.shape[1] != img_shape[0] * img_shape[1]:
                shape, label = squarest_shape(X.shape[1]), f"{label} (codes)"
            ax.imshow(row_strip(X, shape, n_cols), cmap=cmap, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.set_ylabel(label, rotation=0, ha="right", va="center")
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def save_learning_curves(
    histories: dict[str, list[dict]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("train_loss", "val_error"),
) -> Path:
    """Plot per-epoch metrics of several arms (e.g. "pretrained", "random") side by side.

    One subplot per metric, every arm on each. Metrics whose name ends in "error" are
    fractions shown in percent, with each arm's best (lowest) epoch marked by a star.
    Epochs where an arm did not log a metric are skipped; "epoch" defaults to the position.

    Args:
        histories: arm -> per-epoch dicts, e.g. {"epoch": 0, "train_loss": .., "val_error": ..}.
        path: Target ``.png``.
        metrics: Keys of the per-epoch dicts to plot, one subplot each.

    Returns:
        The path written.
    """
    plt = _pyplot()
    if not metrics:
        raise ValueError("metrics is empty: name at least one per-epoch key to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    try:
        for ax, metric in zip(axes[0], metrics):
            is_error = metric.endswith("error")
            for arm, history in histories.items():
                points = [(h.get("epoch", i), h[metric]) for i, h in enumerate(history)
                          if h.get(metric) is not None]
                if not points:
                    continue
                x, y = (np.asarray(v, dtype=float) for v in zip(*points))
                y = 100 * y if is_error else y
                (line,) = ax.plot(x, y, label=arm)
                if is_error:
                    b = int(np.nanargmin(y))
                    ax.plot(x[b], y[b], marker="*", markersize=12, color=line.get_color(),
                            linestyle="none", label=f"{arm} best: {y[b]:.2f}% @ {x[b]:g}")
            ax.set(xlabel="epoch", ylabel=f"{metric} (%)" if is_error else metric, title=metric)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Count matrix ``cm[i, j]`` = #examples of true class i predicted as j, (C, C) int64."""
    y_true, y_pred = (_to_numpy(y).astype(np.int64).ravel() for y in (y_true, y_pred))
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.shape} vs {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} has labels outside [0, {n_classes}): {y.min()}..{y.max()}")
    counts = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def per_class_error(cm: np.ndarray) -> np.ndarray:
    """Per true class, ``1 - cm[i, i] / cm[i].sum()``; 0 (not NaN) for a class with no examples."""
    cm = _to_numpy(cm)
    support = cm.sum(axis=1)  # (C,) examples per true class
    return np.where(support > 0, 1.0 - np.diag(cm) / np.maximum(support, 1), 0.0)


def save_confusion_matrix(
    cm: np.ndarray,
    path_png: str | os.PathLike,
    path_csv: str | os.PathLike,
    class_names: Optional[list[str]] = None,
    title: str = "",
) -> tuple[Path, Path]:
    """Save a confusion matrix as a CSV table and an annotated heatmap.

    Rows are true classes, columns predicted ones. ``pandas.read_csv(path_csv, index_col=0)``
    gives back the matrix (index column "true"). The PNG's y ticks carry per-class error.

    Args:
        cm: (C, C) integer counts, e.g. from :func:`confusion_matrix`.
        path_png: Target ``.png`` (heatmap).
        path_csv: Target ``.csv`` (table).
        class_names: C names; default "0".."C-1".
        title: Figure title.

    Returns:
        (path_png, path_csv).
    """
    import pandas as pd

    cm = _to_numpy(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {cm.shape}")
    C = cm.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(C))]
    if len(names) != C:
        raise ValueError(f"class_names has {len(names)} names for a {C}x{C} matrix")
    df = pd.DataFrame(cm, index=pd.Index(names, name="true"), columns=names)
    csv_path = _atomic_write(path_csv, lambda tmp: df.to_csv(tmp))
    plt = _pyplot()
    size = max(4.0, 0.55 * C + 2.0)  # inches; grows with C so the counts stay legible
    fig, ax = plt.subplots(figsize=(size + 1.0, size), layout="constrained")  # +1: colorbar
    try:
        im = ax.imshow(cm, cmap="Blues", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(C):
            for j in range(C):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
        ax.set_xticks(range(C), names)
        errors = per_class_error(cm)
        ax.set_yticks(range(C), [f"{n} ({100 * e:.1f}%)" for n, e in zip(names, errors)])
        ax.set(xlabel="predicted", ylabel="true", title=title)
        return _save_figure(fig, path_png), csv_path
    finally:
        plt.close(fig)

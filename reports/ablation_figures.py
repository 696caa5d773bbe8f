"""The ablation's standard figures (Erhan et al. 2010, figs. 1-3 and 7): test-error histograms
with and without pretraining per depth (each panel with both arms' std and the Brown–Forsythe
p of equal spread), test error against depth and against the number of
training examples, with bootstrap confidence bands.

Plain functions: the tidy cell table and its summary (``reports.stats.summarize``) in, PNG
files out, written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from reports.figures import _pyplot, _save_figure

COLORS = {"pretrained": "tab:blue", "tutorial": "tab:orange", "xavier": "tab:green",
          "he": "tab:red", "random": "tab:purple"}
LINESTYLES = ("-", "--", ":", "-.")


def _label(keys: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values))


def _groups(frame: pd.DataFrame, keys: Sequence[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(values, rows) per combination of ``keys``; one group of everything without keys."""
    if not keys:
        return [((), frame)]
    return [(k if isinstance(k, tuple) else (k,), g)
            for k, g in frame.groupby(list(keys), dropna=False, sort=True)]


def _name(init: str) -> str:
    return init if init == "pretrained" else f"random ({init} init)"


def _unit(frame: pd.DataFrame) -> tuple[float, str]:
    """(scale, axis label) of the errors in ``frame``: percent, or for reconstruct cells
    (the deep autoencoder) the squared error per test image as it is."""
    if "objective" in frame and (frame["objective"] == "reconstruct").all() and len(frame):
        return 1.0, "squared error per test image"
    return 100.0, "test error (%)"


def _inits(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["init"].unique(), key=lambda s: (s != "pretrained", s))


def histograms(table: pd.DataFrame, by: Sequence[str], path: Path) -> Path:
    """Test-error histograms of each init, one panel per depth (columns) and per combination
    of the other factors (rows); finished cells only."""
    plt = _pyplot()
    ok = table[table["status"] == "ok"]
    depths = sorted(ok["depth"].unique()) or [None]
    others = [c for c in by if c != "depth"]
    rows = _groups(ok, others)
    fig, axes = plt.subplots(len(rows), len(depths), squeeze=False, sharey="row",
                             figsize=(3.2 * len(depths) + 0.6, 2.6 * len(rows) + 0.6))
    for r, (values, frame) in enumerate(rows):
        for c, depth in enumerate(depths):
            ax = axes[r][c]
            panel = frame[frame["depth"] == depth] if depth is not None else frame
            scale, unit = _unit(panel)
            errors = scale * panel["test_error"].to_numpy(dtype=float)
            bins = np.histogram_bin_edges(errors, bins=min(20, max(5, len(errors) // 4))) \
                if errors.size else 10
            for init in _inits(panel):
                e = scale * panel.loc[panel["init"] == init, "test_error"].to_numpy(dtype=float)
                sd = f", std {e.std(ddof=1):.2f}" if e.size > 1 else ""
                ax.hist(e, bins=bins, histtype="stepfilled", alpha=0.45,
                        color=COLORS.get(init, "gray"), edgecolor=COLORS.get(init, "gray"),
                        label=f"{_name(init)}\nmean {e.mean():.2f}{'%' if scale == 100 else ''}"
                              f"{sd}, n={e.size}")
            title = f"depth {depth}" + (f"\n{_label(others, values)}" if others else "")
            if note := spread_note(panel):
                title += f"\n{note}"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(unit)
            if c == 0:
                ax.set_ylabel("seeds")
        # headroom above the tallest bar of the row (its panels share y), for the legends
        axes[r][0].set_ylim(0, 2.1 * max(ax.get_ylim()[1] for ax in axes[r]))
        for ax in axes[r]:
            ax.legend(fontsize=6.5, loc="upper right", handlelength=1.2)
    fig.suptitle("Test error with and without pretraining", fontsize=11)
    path = _save_figure(fig, path)
    plt.close(fig)
    return path


def spread_note(panel: pd.DataFrame) -> str:
    """The Brown–Forsythe p of equal spread, pretrained against each random scheme of one
    panel (``reports.stats.brown_forsythe``), e.g. ``spread: BF p=0.003 (tutorial)``;
    empty when a side has fewer than 2 finished seeds."""
    from reports.stats import brown_forsythe

    errors = {init: panel.loc[panel["init"] == init, "test_error"].to_numpy(dtype=float)
              for init in _inits(panel)}
    pre = errors.pop("pretrained", None)
    if pre is None:
        return ""
    notes = [f"BF p={p:.2g} ({init})" for init, e in errors.items()
             if (p := brown_forsythe(pre, e)[1]) == p]  # p == p: not nan
    return ("spread: " + ", ".join(notes)) if notes else ""


def error_against(summary: pd.DataFrame, x: str, by: Sequence[str], path: Path,
                  log_x: bool = False) -> Path:
    """Mean test error against factor ``x``, one line per init and combination of the other
    factors, with the bootstrap confidence band of the mean."""
    plt = _pyplot()
    others = [c for c in by if c != x]
    groups = _groups(summary, others)
    n_lines = sum(frame["init"].nunique() for _, frame in groups)
    fig, ax = plt.subplots(figsize=(6.4 + (3.6 if n_lines > 6 else 0), 4.2))
    units = set()
    for i, (values, frame) in enumerate(groups):
        style = LINESTYLES[i % len(LINESTYLES)]
        scale, unit = _unit(frame)
        units.add(unit)
        for init in _inits(frame):
            line = frame[(frame["init"] == init) & (frame["n"] > 0)].sort_values(x)
            if line.empty:
                continue
            xs = line[x].to_numpy(dtype=float)
            color = COLORS.get(init, "gray")
            label = _name(init) + (f"; {_label(others, values)}" if others else "")
            ax.plot(xs, scale * line["mean"], style, marker="o", color=color, label=label)
            ax.fill_between(xs, scale * line["ci_low"], scale * line["ci_high"], color=color,
                            alpha=0.15, linewidth=0)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.set_xticks(sorted(summary[x].dropna().unique()))
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(" | ".join(sorted(units)) + ", mean and CI")
    ax.set_title(f"Test error against {x.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    if n_lines > 6:  # many lines: the legend goes beside the axes, not over them
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)
    path = _save_figure(fig, path)
    plt.close(fig)
    return path


def draw_all(table: pd.DataFrame, summary: pd.DataFrame, by: Sequence[str],
             out_dir: Path) -> dict[str, Path]:
    """Every figure the grid supports: histograms and error-vs-depth always, error-vs-n_train
    when n_train varies."""
    out_dir = Path(out_dir)
    files = {"histograms": histograms(table, by, out_dir / "test_error_histograms.png"),
             "error_vs_depth": error_against(summary if "depth" in summary else
                                             _with_constant(summary, table, "depth"),
                                             "depth", by, out_dir / "test_error_vs_depth.png")}
    if "n_train" in summary and summary["n_train"].nunique() > 1:
        files["error_vs_n_train"] = error_against(summary, "n_train", by,
                                                  out_dir / "test_error_vs_n_train.png",
                                                  log_x=True)
    return files


def _with_constant(summary: pd.DataFrame, table: pd.DataFrame, column: str) -> pd.DataFrame:
    """The summary with a factor that did not vary (so is not a group column) added back."""
    values = table[column].dropna().unique()
    return summary.assign(**{column: values[0] if len(values) else np.nan})

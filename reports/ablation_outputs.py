"""The ablation's record: one tidy row and one MLflow child run per cell, the progress
line, the output files (table, summary, grid, figures), the parent run's metrics and
artifacts, and the summary as text and as a Prefect table artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from config.grid_spec import Cell, Grid
from tracking.live import LiveRun, complete_history
from tracking.tracker import Tracker

from tracking.vocabulary import (CACHED_TAG, CELL_TAG, ERROR_TAG, LAYER_KEY_TAG, LAYER_TAG,
                                 NOTE_TAG, RESUMED_TAG, STATUS_TAG)


def cell_row(cell: Cell, outcome: Optional[Any], status: str, error: str) -> dict[str, Any]:
    """One row of the tidy table: the cell's factors, its results (a
    ``tasks.ablation_cells.CellOutcome``, None when it has none) and its status."""
    fields = outcome.model_dump(exclude={"status", "error"}) if outcome else {}
    return {"cell": cell.id, **cell.factors, "arm": cell.arm, "status": status,
            "test_error": fields.get("test_error"), "val_error": fields.get("val_error"),
            "train_loss": fields.get("train_loss"), "epochs_run": fields.get("epochs_run"),
            "train_seconds": fields.get("train_seconds"),
            "pretrain_seconds": fields.get("pretrain_seconds"),
            "wall_seconds": fields.get("wall_seconds"), "cached": fields.get("cached", False),
            "resumed_from_epoch": fields.get("resumed_from_epoch", 0), "error": error}


def reconstructs(row: Any) -> bool:
    """Whether a row (cell or summary) is of the reconstruct objective, whose error is the
    squared error per test image, not a fraction."""
    return row.get("objective") == "reconstruct"


def progress_line(i: int, n: int, row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        result = row["error"].splitlines()[0][:80]
    elif reconstructs(row):
        result = f"test {row['test_error']:8.3f} sq. error/image"
    else:
        result = f"test {100 * row['test_error']:6.2f} %"
    cached = "  (from cache)" if row["cached"] else ""
    return f"  [{i:>{len(str(n))}}/{n}] {row['status']:<8} {row['cell']}  {result}{cached}"


class AblationRuns:
    """The ablation's child runs: one per cell and one per distinct pretraining layer, all
    opened before anything trains so that each can be watched: the worker training a cell
    or a layer logs its epochs to its run as they end (``live``). A cell's run ends when the
    cell settles (``log_cell``), a layer's after the cells (``log_layer``). Used as a
    context manager: an interruption or an error ends every run still open KILLED or
    FAILED, never RUNNING.

    Args:
        layers: The distinct pretraining layers by key (``tasks.ablation_plan.LayerNode``:
            ``key``, ``k``, ``config``).
        stacks: Each pretrained cell's layer keys, bottom first.
    """

    def __init__(self, tracker: Tracker, parent: str, cells: list[Cell],
                 layers: dict[str, Any], stacks: dict[str, list[str]]):
        self.tracker, self.parent, self.cells, self.layers = tracker, parent, cells, layers
        self.readers = {key: sum(key in keys for keys in stacks.values()) for key in layers}
        self.ids: dict[str, str] = {}
        self.layer_ids: dict[str, str] = {}
        self.ended: set[str] = set()

    def __enter__(self) -> "AblationRuns":
        try:
            for node in self.layers.values():
                seed = node.config.runtime.seed
                self.layer_ids[node.key] = self.tracker.start_run(
                    f"layer-{node.k + 1}/{node.key[:8]}", {
                        LAYER_TAG: str(node.k + 1), LAYER_KEY_TAG: node.key, "seed": str(seed),
                        NOTE_TAG: f"Pretraining layer {node.k + 1} of seed {seed}, shared by "
                                  f"{self.readers[node.key]} pretrained cell(s)."},
                    self.parent)
            for cell in self.cells:
                self.ids[cell.id] = self.tracker.start_run(cell.id, {
                    CELL_TAG: cell.id, "layerwise.arm": cell.arm,
                    **{k: str(v) for k, v in cell.factors.items()}}, self.parent)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> None:
        if exc is None:
            return
        for run in [*self.layer_ids.values(), *self.ids.values()]:
            if run not in self.ended:
                self.tracker.end_run(run, exc)
                self.ended.add(run)

    def layer_live(self, key: str) -> LiveRun:
        """Where the worker training the layer ``key`` writes its epochs."""
        return LiveRun(tracking_uri=self.tracker.uri, experiment=self.tracker.experiment,
                       run_id=self.layer_ids[key])

    def log_layer(self, key: str, outcome: Optional[Any], status: str, error: str) -> None:
        """A layer's record in its run, once every cell has settled: the epochs its run
        does not hold yet (all of them for a layer from the cache), its training time and
        checkpoint digest; FINISHED, or FAILED with the error for a layer that diverged,
        failed or sits on one that did."""
        run, k = self.layer_ids[key], self.layers[key].k
        layer = outcome.layer if outcome is not None and status == "ok" else None
        tags = {STATUS_TAG: status, **({ERROR_TAG: error[:5000]} if error else {})}
        if layer is not None:
            tags |= {CACHED_TAG: str(outcome.cached).lower(),
                     "checkpoint.sha256": layer.checkpoint.sha256}
            complete_history(self.tracker, run, f"pretrain/layer_{k + 1}", layer.history)
            self.tracker.log_metrics(run, {f"pretrain/layer_{k + 1}/train_seconds":
                                           layer.train_seconds})
        self.tracker.set_tags(run, tags)
        self.tracker.end_run(run, status="FINISHED" if layer is not None else "FAILED")
        self.ended.add(run)

    def live(self, cell: Cell) -> LiveRun:
        """Where the worker training ``cell`` writes its epochs."""
        return LiveRun(tracking_uri=self.tracker.uri, experiment=self.tracker.experiment,
                       run_id=self.ids[cell.id])

    def log_cell(self, cell: Cell, row: dict[str, Any], outcome: Optional[Any]) -> None:
        """The cell's record in its run: its status, errors and where it resumed as tags;
        its test and validation errors; the epochs of its fine-tuning the run does not hold
        yet (all of them for a cell from the cache, or one that repeats another cell's
        run); then the run ends FINISHED, or FAILED for a cell that did not finish."""
        run = self.ids[cell.id]
        tags = {STATUS_TAG: row["status"], CACHED_TAG: str(bool(row["cached"])).lower()}
        if row["error"]:
            tags[ERROR_TAG] = row["error"][:5000]
        if row.get("resumed_from_epoch"):  # its fine-tuning continued from an epoch checkpoint
            tags[RESUMED_TAG] = str(row["resumed_from_epoch"])
        self.tracker.set_tags(run, tags)
        if row["status"] == "ok":
            complete_history(self.tracker, run, "finetune", outcome.history if outcome else [])
            self.tracker.log_metrics(run, {
                "test/error": row["test_error"], "val/error": row["val_error"],
                "finetune/epochs_run": row["epochs_run"],
                "finetune/train_seconds": row["train_seconds"]})
        self.tracker.end_run(run, status="FINISHED" if row["status"] == "ok" else "FAILED")
        self.ended.add(run)


def write_outputs(out: Path, grid: Grid, table: Any, summary: Any, by: list[str]
                  ) -> dict[str, Path]:
    """The table (CSV, Parquet), the summary (CSV), the grid (YAML) and the figures."""
    import yaml

    from reports import ablation_figures

    out.mkdir(parents=True, exist_ok=True)
    files = {"table_csv": out / "cells.csv", "table_parquet": out / "cells.parquet",
             "summary_csv": out / "summary.csv", "grid": out / "grid.yaml"}
    table.to_csv(files["table_csv"], index=False)
    table.to_parquet(files["table_parquet"], index=False)
    summary.to_csv(files["summary_csv"], index=False)
    files["grid"].write_text(yaml.safe_dump(grid.model_dump(mode="json", exclude_none=True),
                                            sort_keys=False))
    for name, path in ablation_figures.draw_all(table, summary, by, out / "figures").items():
        files[f"figure_{name}"] = path
    return files


def record(tracker: Tracker, parent: str, table: Any, files: dict[str, Path]) -> None:
    """Parent-run metrics (cell counts) and artifacts (table, summary, grid, figures)."""
    tracker.log_metrics(parent, {
        "cells/total": len(table), "cells/ok": int((table.status == "ok").sum()),
        "cells/failed": int((table.status == "failed").sum()),
        "cells/diverged": int((table.status == "diverged").sum())})
    for name, path in files.items():
        tracker.log_artifact(parent, path, "figures" if name.startswith("figure_") else "ablation")


def format_summary(summary: Any, by: list[str], level: float) -> str:
    """The summary as a plain-text table: errors in percent (Δ in points), or for the
    reconstruct objective as squared error per test image (``unit`` column); the p-values
    of the means (Wilcoxon, Welch) and of the spreads (Brown–Forsythe F and p)."""
    import pandas as pd

    sq = [reconstructs(row) for _, row in summary.iterrows()]

    def fmt(values: Any) -> list[str]:
        return ["" if pd.isna(v) else f"{v:.3f}" if r else f"{100 * v:.2f}"
                for v, r in zip(values, sq)]

    def ci(lows: Any, highs: Any) -> list[str]:
        return [f"[{lo}, {hi}]" if lo else "" for lo, hi in zip(fmt(lows), fmt(highs))]

    sig = lambda v: "" if pd.isna(v) else f"{v:.3g}"  # noqa: E731
    view = pd.DataFrame({
        **{c: summary[c] for c in by}, "init": summary["init"], "n": summary["n"],
        "failed": summary["n_failed"], "unit": ["sq/img" if r else "%" for r in sq],
        "mean": fmt(summary["mean"]), "std": fmt(summary["std"]),
        "median": fmt(summary["median"]),
        f"{100 * level:g}% CI": ci(summary.ci_low, summary.ci_high),
        "Δ pre−rnd": fmt(summary["diff_mean"]),
        "Δ CI": ci(summary.diff_ci_low, summary.diff_ci_high),
        "pairs": summary["n_pairs"].map(lambda v: "" if pd.isna(v) else str(int(v))),
        "p Wilcoxon": summary["p_wilcoxon"].map(sig), "p Welch": summary["p_welch"].map(sig),
        # the spread: Brown–Forsythe F of pretrained against this row's random arm, its p
        "BF F": summary["bf_stat"].map(sig), "p BF": summary["p_brown_forsythe"].map(sig),
    })
    return view.to_string(index=False)


def summary_artifact(summary: Any, grid: Grid) -> None:
    """The summary as a Prefect table artifact (NaN shown as empty cells)."""
    import json

    from prefect.artifacts import create_table_artifact

    records = json.loads(summary.to_json(orient="records"))  # NaN -> null, numpy -> JSON
    create_table_artifact(records, key="layerwise-ablation-summary",
                          description=f"Ablation {grid.name}: test error per group and init "
                                      "(fractions); diff = pretrained − random")

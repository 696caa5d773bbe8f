"""float32 against bf16 mixed precision, paired by seed: the evidence behind
``runtime.precision = auto`` (``runtime/precision.py``).

The shipped grid ``config/grids/precision.yaml`` trains 4 variants (sigmoid / ReLU ×
``32-true`` / ``bf16-mixed``) × {pretrained, random} × 10 seeds as populations of 10
(``layerwise ablate --preset precision --population 10``). Cells that differ only in
precision are paired on (activation, arm, seed); for each (activation, arm) and for all 40
pairs the comparison reports the mean test errors, the mean paired difference
(bf16 − fp32) with its percentile-bootstrap 95 % CI, the paired t and Wilcoxon p-values, and
the seed spread (std over seeds of the fp32 errors) that the difference is judged against.

What ``auto`` needs is that bf16-mixed is not *worse*: non-inferiority, the upper bound of
the difference's 95 % CI at most ``NONINFERIORITY_MARGIN`` × the seed spread (a one-sided
test at 2.5 %). A detected difference in bf16's favour is reported, not hidden.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from benchmarks.bench_startup import layerwise_command
from benchmarks.common import REPO
from reports.stats import bootstrap_ci, paired_t, wilcoxon_p

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
#: bf16-mixed may be worse than float32 by at most this fraction of the seed spread.
NONINFERIORITY_MARGIN = 0.5


def compare(cells: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per (activation, arm) and one for all pairs, from the grid's cells table."""
    ok = cells[cells["status"] == "ok"].copy()
    ok["precision"] = ok["variant"].str.rsplit("-", n=1).str[1]
    wide = ok.pivot_table(index=["activation", "arm", "seed"], columns="precision",
                          values=["test_error", "train_seconds"]).dropna()
    groups = [(f"{a} {arm}", wide.xs((a, arm), level=("activation", "arm")))
              for a, arm in sorted({i[:2] for i in wide.index})]
    rows = []
    for name, g in [*groups, ("all pairs", wide)]:
        fp32, bf16 = g[("test_error", "fp32")], g[("test_error", "bf16")]
        d = (bf16 - fp32).to_numpy()
        lo, hi = bootstrap_ci(d)
        t, p_t = paired_t(d)
        rows.append({
            "group": name, "n_pairs": int(len(d)),
            "fp32_mean": round(float(fp32.mean()), 5), "bf16_mean": round(float(bf16.mean()), 5),
            "diff_mean": round(float(d.mean()), 5), "diff_ci_low": round(lo, 5),
            "diff_ci_high": round(hi, 5), "p_paired_t": round(p_t, 4),
            "p_wilcoxon": round(wilcoxon_p(d), 4),
            "fp32_seed_std": round(float(fp32.std(ddof=1)), 5),
            # per group only: the pooled row's spread mixes the groups' error levels
            "noninferior": (bool(hi <= NONINFERIORITY_MARGIN * float(fp32.std(ddof=1)))
                            if g is not wide else None),
            "train_s_fp32": round(float(g[("train_seconds", "fp32")].sum()), 1),
            "train_s_bf16": round(float(g[("train_seconds", "bf16")].sum()), 1),
        })
    return rows


def run(data_dir: Path, table: Optional[Path] = None, threads: Optional[int] = None,
        log=print) -> dict[str, Any]:
    """Compare the cells of ``table`` (a ``cells.csv``), or run the grid first."""
    with tempfile.TemporaryDirectory(prefix="layerwise-precision-") as tmp:
        if table is None:
            out = Path(tmp) / "out"
            env = dict(os.environ, LAYERWISE_HOME=str(Path(tmp) / "home"), CI="1")
            env.pop("MLFLOW_TRACKING_URI", None)
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            subprocess.run([*layerwise_command(), "ablate", "--preset", "precision",
                            "--population", "10", "--data-dir", str(data_dir), "--out",
                            str(out)], cwd=REPO, env=env, check=True, capture_output=True)
            table = out / "cells.csv"
        rows = compare(pd.read_csv(table))
    log(f"  {'group':<20} {'pairs':>5} {'fp32':>7} {'bf16':>7} {'bf16-fp32 (95% CI)':>26} "
        f"{'p t':>6} {'p W':>6} {'seed std':>8}  not worse")
    for r in rows:
        log(f"  {r['group']:<20} {r['n_pairs']:>5} {100 * r['fp32_mean']:>6.2f}% "
            f"{100 * r['bf16_mean']:>6.2f}% {100 * r['diff_mean']:>+7.2f}pp "
            f"[{100 * r['diff_ci_low']:+.2f}, {100 * r['diff_ci_high']:+.2f}] "
            f"{r['p_paired_t']:>6.3f} {r['p_wilcoxon']:>6.3f} {100 * r['fp32_seed_std']:>7.2f}pp  "
            f"{ {True: 'yes', False: 'NO', None: ''}[r['noninferior']]}")
    return {"grid": "config/grids/precision.yaml", "rows": rows}

"""``python -m benchmarks``: run the benchmarks, print a table and the targets, write
``benchmarks/results/<machine>.json``.

    python -m benchmarks                      # everything (about 15 minutes on 2 CPU cores)
    python -m benchmarks --only training      # or update, adam, population, twins,
                                              # recording, startup, precision
    python -m benchmarks --threads 1          # intra-op threads (default: torch's)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

PARTS = ("training", "update", "adam", "population", "twins", "recording", "startup",
         "precision")
#: On CPU, at batch >= 20, the project's path must reach this share of the bare loop's speed.
MIN_RATIO = 0.9
MAX_HELP_S = 1.0
#: Issue 17: the training loop's share of torch.mm's rate at the same shapes, per batch size.
MIN_MATMUL_FRACTION = {20: 0.6, 256: 0.85}


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="MNIST root (default: $LAYERWISE_DATA_DIR or ../shared/data; "
                        "generated data of the same shape when absent)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats, best kept")
    p.add_argument("--batch-sizes", default="1,20,256")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--cold", action="store_true",
                   help="also time a first-ever quick run (fresh PREFECT_HOME)")
    p.add_argument("--precision-table", type=Path, default=None,
                   help="cells.csv of an earlier `layerwise ablate --preset precision` run "
                        "(default: run the grid, about 10 minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=None, help="results file")
    return p.parse_args(argv)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/FAIL lines: measured facts, not assertions."""
    out = []
    on_cpu = result["device"].startswith("cpu")
    for row in result.get("training", []):
        if on_cpu and row["batch_size"] >= 20:
            out.append({
                "target": f"{row['stage']} B={row['batch_size']}: project ≥ {MIN_RATIO}× bare",
                "value": row["ratio"], "pass": row["ratio"] >= MIN_RATIO,
                "note": f"CPU-time ratio {row['cpu_ratio']}",
            })
    for row in result.get("training", []):
        need = MIN_MATMUL_FRACTION.get(row["batch_size"])
        for prefix, label in (("", "float32"), ("bf16_", "bf16-mixed")):
            value = row.get(f"{prefix}matmul_fraction")
            if on_cpu and need and value is not None:
                out.append({"target": f"{row['stage']} B={row['batch_size']} {label}: ≥ {need} "
                                      "of torch.mm's rate", "value": value,
                            "pass": value >= need, "note": ""})
    prec = result.get("precision")
    if prec:
        from benchmarks.bench_precision import NONINFERIORITY_MARGIN

        for row in prec["rows"][:-1]:  # the groups; the pooled row mixes their spreads
            out.append({"target": f"bf16-mixed not worse than float32, {row['group']}: upper "
                                  f"95% CI bound ≤ {NONINFERIORITY_MARGIN} × seed std",
                        "value": row["diff_ci_high"], "pass": row["noninferior"],
                        "note": f"difference {row['diff_mean']:+} [{row['diff_ci_low']}, "
                                f"{row['diff_ci_high']}], seed std {row['fp32_seed_std']}, "
                                f"{row['n_pairs']} pairs, paired t p={row['p_paired_t']}"})
    rec = result.get("recording")
    if rec:
        from benchmarks.bench_recording import MAX_FRACTION

        for what in ("live_logging", "checkpoint"):
            out.append({"target": f"{what.replace('_', ' ')} ≤ {100 * MAX_FRACTION:.0f} % of "
                                  "a default epoch", "value": rec[f"{what}_fraction"],
                        "pass": rec[f"{what}_fraction"] <= MAX_FRACTION,
                        "note": f"{rec[f'{what}_s']} s against {rec['default_epoch_s_extrapolated']} s"})
    pop = result.get("population")
    if pop:
        out.append({"target": f"population P={pop['P']} not slower than {pop['P']} sequential "
                              "bare runs (all stages)", "value": pop["speedup"],
                    "pass": pop["speedup"] >= 1.0,
                    "note": f"CPU time {pop['cpu_speedup']}×; {pop['sequential_project_s_est']} s "
                            f"for {pop['P']} runs of the project's path"})
        for row in pop["stages"]:
            out.append({"target": f"population {row['config']} {row['stage']} not slower",
                        "value": row["speedup"], "pass": row["speedup"] >= 1.0,
                        "note": f"CPU time {row['cpu_speedup']}×, vs the project's path "
                                f"{row['speedup_vs_project']}×"})
    quick = result.get("quick_run") or {}
    if quick.get("outside_training_s") is not None:
        from benchmarks.bench_startup import MAX_OUTSIDE_S

        out.append({"target": f"quick run: ≤ {MAX_OUTSIDE_S} s outside its training loops",
                    "value": quick["outside_training_s"],
                    "pass": quick["outside_training_s"] <= MAX_OUTSIDE_S,
                    "note": f"{quick['before_parent_s']} s before the parent run, "
                            f"{quick['inside_other_s']} s inside it besides training, "
                            f"{quick['after_parent_s']} s after it; importing torch, Lightning, "
                            f"MLflow and Prefect alone takes {quick.get('imports_s')} s"})
    if "help_s" in result:
        out.append({"target": f"layerwise --help < {MAX_HELP_S} s", "value": result["help_s"],
                    "pass": result["help_s"] < MAX_HELP_S, "note": ""})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}", file=sys.stderr)
        return 2
    os.environ.setdefault("CI", "1")  # no progress bars in the measured runs, as when piped
    warnings.filterwarnings("ignore")  # Lightning's advice about workers and CPU
    import lightning
    import torch

    from benchmarks import (bench_adam, bench_population, bench_precision, bench_recording,
                            bench_startup, bench_training, bench_twins, bench_update)
    from benchmarks.common import REPO, describe, device, load, load_avg, machine_name

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device()
    out = args.out or REPO / "benchmarks" / "results" / f"{machine_name(dev)}.json"
    result: dict[str, Any] = {}
    if out.exists() and set(parts) != set(PARTS):
        result = json.loads(out.read_text())  # keep the parts not rerun
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result.update({
        "device": describe(dev), "machine": machine_name(dev),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(), "load_avg_start": load_avg(),
    })
    print(f"layerwise benchmarks on {result['device']} (load average {result['load_avg_start']})")
    if {"training", "population", "twins", "recording"} & set(parts):
        n_train = max(bench_training.STEPS[b] * b for b in batch_sizes)
        data = load(args.data_dir, n_train, bench_training.N_VALID)
        result["data"] = data.source
        print(f"data: {data.source}")
    if "training" in parts:
        print("training: the project's engine at P = 1 (a) against a bare PyTorch loop (b)")
        result["training"] = bench_training.run(data, args.repeats, batch_sizes)
    if "update" in parts:
        print("update: the bf16-mixed SGD update and cast, eager against torch.compile")
        result["update"] = bench_update.run(repeats=max(3, args.repeats))
    if "adam" in parts:
        print("adam: the deep autoencoder's fine-tuning step, default Adam against fused")
        result["adam"] = bench_adam.run(repeats=max(3, args.repeats))
    if "population" in parts:
        print(f"population: {bench_population.P} seeds batched against sequential runs")
        result["population"] = bench_population.run(data, repeats=args.repeats)
    if "twins" in parts:
        print("twins: the default preset's fine-tuning, both arms as one population or in turn")
        result["twins"] = bench_twins.run(data, repeats=args.repeats)
    if "recording" in parts:
        print("recording: live MLflow logging and the epoch checkpoint, per default epoch")
        result["recording"] = bench_recording.run(data)
    if "startup" in parts:
        from benchmarks.common import DEFAULT_DATA_DIR

        result["help_s"] = bench_startup.help_seconds()
        print(f"startup: layerwise --help {result['help_s']:.2f} s")
        data_dir = args.data_dir or Path(os.environ.get("LAYERWISE_DATA_DIR", DEFAULT_DATA_DIR))
        if (data_dir / "MNIST" / "raw").is_dir():
            result["quick_run"] = bench_startup.run(data_dir, cold=args.cold,
                                                     threads=args.threads,
                                                     repeats=min(args.repeats, 3))
        else:
            print(f"  no MNIST under {data_dir}: the quick pipeline run is skipped")
    if "precision" in parts:
        from benchmarks.common import DEFAULT_DATA_DIR

        print("precision: float32 against bf16-mixed, paired by seed (config/grids/precision.yaml)")
        data_dir = args.data_dir or Path(os.environ.get("LAYERWISE_DATA_DIR", DEFAULT_DATA_DIR))
        result["precision"] = bench_precision.run(data_dir, table=args.precision_table,
                                                  threads=args.threads)
    result["load_avg_end"] = load_avg()
    result["targets"] = targets(result)
    print("targets:")
    for t in result["targets"]:
        note = f"  ({t['note']})" if t["note"] else ""
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']}{note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0

"""Mistakes found before any MLflow run or training: each bad input is run as a user
would (a subprocess of the CLI) and must exit 2 with a message naming the field or file
and the fix, without a traceback, and without creating an MLflow store or run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str, env: dict | None = None, timeout: int = 120,
        script: Path | None = None) -> subprocess.CompletedProcess:
    """``layerwise ARGS`` in a fresh process with its own LAYERWISE_HOME and no GPU (through
    ``script`` instead of ``python -m cli.main`` when given)."""
    environ = {**os.environ, "LAYERWISE_HOME": str(home), "CUDA_VISIBLE_DEVICES": "",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    environ.pop("MLFLOW_TRACKING_URI", None)
    entry = [str(script)] if script else ["-m", "cli.main"]
    return subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, home: Path, *named: str) -> str:
    """Exit 2, every ``named`` text in the message, no traceback, no MLflow store."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert "before any training or MLflow run started" in proc.stderr, out
    for text in named:
        assert text in proc.stderr, (text, out)
    assert not (home / "mlflow.db").exists() and not (home / "stages").exists()
    return proc.stderr


def npz(path: Path, y_train: np.ndarray, rows: int = 300, features: int = 16) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((rows, features), dtype=np.float32), y_train=y_train,
             x_test=rng.random((50, features), dtype=np.float32),
             y_test=rng.integers(0, 3, 50))
    return path


@pytest.fixture()
def home(tmp_path) -> Path:
    return tmp_path / "home"


QUICK = ["run", "--preset", "quick"]


@pytest.mark.parametrize("args,named", [
    (["--experiment", ""], ["--experiment ''", "--experiment layerwise"]),
    (["--model-name", ""], ["--model-name ''", "--model-name layerwise-classifier"]),
    (["--model-name", "../../evil"], ["--model-name '../../evil'", "without '/'"]),
    (["--tracking-uri", "foo://x"], ["'foo://x'", "unknown scheme 'foo'", "sqlite:///"]),
    (["--tracking-uri", "file:///tmp/mlruns"], ["'file:///tmp/mlruns'", "file store",
                                                 "--tracking-uri sqlite:///"]),
    (["--tracking-uri", "postgresql+pg8000://u@127.0.0.1/db"],
     ["driver pg8000", "not installed", "pip install"]),
    (["--tracking-uri", "postgresql://postgres@127.0.0.1:1/test"],
     ["127.0.0.1:1", "does not accept connections", "start it"]),
    (["--set", "runtime.accelerator=gpu"], ["runtime.accelerator='gpu'", "no usable CUDA GPU",
                                            "--set runtime.accelerator=cpu"]),
    (["--set", "model.hidden_sizes=[1000000000]", "--set", "pretrain.corruption_levels=[0.1]"],
     ["model.hidden_sizes=[1000000000] needs about", "GiB", "available memory",
      "the largest that fits is --set model.hidden_sizes=["]),
])
def test_run_refuses_a_bad_input_before_any_work(home, shared_data_dir, args, named):
    refused(cli(home, *QUICK, "--data-dir", str(shared_data_dir), *args), home, *named)


def test_every_problem_is_reported_at_once(home, shared_data_dir):
    err = refused(cli(home, *QUICK, "--data-dir", str(shared_data_dir), "--experiment", "",
                      "--model-name", "a:b", "--tracking-uri", "foo://x"), home,
                  "3 problems", "--experiment ''", "--model-name 'a:b'", "'foo://x'")
    assert err.count("\n  - ") == 3


def test_one_huge_label_is_refused_before_anything_is_allocated(home, tmp_path):
    y = np.random.default_rng(1).integers(0, 3, 300)
    y[7] = 2**40  # an id, not a class: 2^40 outputs would need terabytes
    path = npz(tmp_path / "ids.npz", y)
    refused(cli(home, *QUICK, "--dataset", str(path), "--set", "data.n_valid=50",
                "--set", "data.n_train=200"), home,
            f"{path}: y_train holds the label {2**40}", "only 350 labelled rows",
            "renumber them")


def test_labels_within_the_rows_pass_the_label_check(tmp_path):
    from preflight.checks import data_shape

    path = npz(tmp_path / "ok.npz", np.arange(300) % 299)  # label 298 < 300 rows
    shape, problems = data_shape(str(path))
    assert problems == [] and (shape.n_rows, shape.n_features, shape.n_classes) == (350, 16, 299)


@pytest.fixture()
def read_only_dir(tmp_path):
    """A folder on a read-only file system (a read-only tmpfs when running as root, whom
    permissions do not stop; else a folder without write permission)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_layerwise_home_is_refused(read_only_dir, shared_data_dir):
    home = read_only_dir / "home"
    err = refused(cli(home, *QUICK, "--data-dir", str(shared_data_dir)), home,
                  f"LAYERWISE_HOME {home} is not writable", "set LAYERWISE_HOME")
    assert "Read-only file system" in err or "Permission denied" in err


def test_a_layerwise_home_under_a_file_is_refused(tmp_path, shared_data_dir):
    (tmp_path / "file").write_text("x")
    home = tmp_path / "file" / "home"
    refused(cli(home, *QUICK, "--data-dir", str(shared_data_dir)), home,
            f"LAYERWISE_HOME {home} is not writable", "Not a directory")


def test_ablate_preflights_every_cell_before_the_first_trains(home, shared_data_dir, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: wide\nbase:\n  preset: quick\n  overrides:\n"
                    "    data: {n_train: 200}\n    model: {hidden_sizes: [32]}\n"
                    "    pretrain: {epochs: 1, corruption_levels: [0.2]}\n"
                    "factors:\n  width: [32, 1000000000]\n  init: [pretrained, random]\n"
                    "  seeds: [0, 1]\n")
    err = refused(cli(home, "ablate", "--grid", str(grid), "--data-dir", str(shared_data_dir),
                      "--out", str(tmp_path / "out")), home,
                  "model.hidden_sizes=[1000000000] needs about")
    line = next(x for x in err.splitlines() if "needs about" in x)
    assert "width=1000000000" in line and "width=32" not in line  # the bad cells, named
    assert not (tmp_path / "out").exists()


def test_ablate_refuses_a_bad_experiment_and_tracking_uri(home, shared_data_dir):
    refused(cli(home, "ablate", "--preset", "tiny", "--data-dir", str(shared_data_dir),
                "--experiment", "", "--tracking-uri", "file:///tmp/x"), home,
            "2 problems", "--experiment ''", "file store")


def test_schedule_serve_refuses_before_registering_anything(home, shared_data_dir):
    proc = cli(home, "schedule", "serve", "--interval", "60", "--preset", "quick",
               "--data-dir", str(shared_data_dir), "--model-name", "../../evil",
               env={"PREFECT_API_URL": "http://127.0.0.1:1/api"})
    refused(proc, home, "--model-name '../../evil'")

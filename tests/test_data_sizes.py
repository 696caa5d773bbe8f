"""Sizes that fit the data: validation splits, the preset's "at most" n_train, and every
size rule checked from the file's header before start-up, with the fix named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from config.overrides import resolve_config
from config.stages import DataConfig
from tasks.data import load_data
from runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def digits_like(path: Path, n: int = 1437, n_test: int = 360, n_valid: int = 0) -> np.ndarray:
    """An .npz shaped like a small real dataset: 64 uint8 features, 4 learnable classes.
    Feature 0 holds the row id (mod 256) and feature 1 its high byte, to trace rows."""
    rng = np.random.default_rng(0)
    total = n + n_valid + n_test
    y = np.arange(total) % 4  # balanced classes, in file order
    mu = rng.random((4, 64))  # (C, D) class means
    x = (np.clip(mu[y] + 0.15 * rng.normal(size=(total, 64)), 0, 1) * 255).astype(np.uint8)
    x[:, 0], x[:, 1] = np.arange(total) % 256, np.arange(total) // 256
    arrays = {"x_train": x[:n], "y_train": y[:n], "x_test": x[-n_test:], "y_test": y[-n_test:]}
    if n_valid:
        arrays |= {"x_valid": x[n:n + n_valid], "y_valid": y[n:n + n_valid]}
    np.savez(path, **arrays)
    return y


def row_ids(x) -> np.ndarray:
    b = np.rint(x[:, :2].numpy().astype(np.float64) * 255).astype(np.int64)
    return b[:, 1] * 256 + b[:, 0]


def test_default_validation_is_a_stratified_seeded_tenth(tmp_path):
    y = digits_like(tmp_path / "d.npz")
    b = load_data(DataConfig(dataset=str(tmp_path / "d.npz")))
    # round(0.1 * 1437) = 144 rows; quotas 144 * (360, 359, 359, 359) / 1437 -> 36 each
    assert (len(b.x_train), len(b.x_valid)) == (1293, 144)
    assert b.summary()["class_counts_valid"] == [36, 36, 36, 36]
    train, valid = row_ids(b.x_train), row_ids(b.x_valid)
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(1437))
    assert np.array_equal(train, np.sort(train))  # file order kept
    assert np.array_equal(b.y_valid.numpy(), y[valid])
    other = load_data(DataConfig(dataset=str(tmp_path / "d.npz"), subset_seed=1))
    assert not np.array_equal(row_ids(other.x_valid), valid) and other.digest != b.digest
    half = load_data(DataConfig(dataset=str(tmp_path / "d.npz"), valid_fraction=0.5))
    assert len(half.x_valid) == 719  # round half up: 718.5 -> 719


def test_npz_with_its_own_validation_split_uses_it(tmp_path):
    digits_like(tmp_path / "v.npz", n=400, n_valid=50)
    b = load_data(DataConfig(dataset=str(tmp_path / "v.npz")))
    assert (len(b.x_train), len(b.x_valid)) == (400, 50)
    assert np.array_equal(row_ids(b.x_valid), np.arange(400, 450))
    config = resolve_config("quick", dataset=str(tmp_path / "v.npz"))
    assert config.data.n_valid is None and config.data.n_train is None
    with pytest.raises(ConfigError, match="carries its own validation split \\(50 rows\\).*"
                                          "--set data.n_valid=null"):
        resolve_config("quick", dataset=str(tmp_path / "v.npz"), sets=["data.n_valid=30"])


def test_quick_preset_adapts_to_a_small_file_from_its_header(tmp_path, monkeypatch):
    digits_like(tmp_path / "d.npz")

    def refuse(*a, **k):
        raise AssertionError("the size check must read headers only")

    monkeypatch.setattr(np, "load", refuse)
    config = resolve_config("quick", dataset=str(tmp_path / "d.npz"))
    assert config.data.n_train is None  # the preset's 5000 is "at most": all 1293
    assert config.data.n_valid is None  # a tenth, stratified
    big = tmp_path / "big.npz"
    np.savez(big, x_train=np.zeros((6000, 2)), y_train=np.zeros(6000), x_test=np.zeros((5, 2)),
             y_test=np.zeros(5))  # fmt: skip
    assert resolve_config("quick", dataset=str(big)).data.n_train == 5000  # fits: kept


def test_all_size_problems_are_reported_together_with_values_that_work(tmp_path):
    digits_like(tmp_path / "d.npz")
    with pytest.raises(ConfigError) as e:
        resolve_config("quick", dataset=str(tmp_path / "d.npz"),
                       sets=["data.n_train=5000", "finetune.batch_size=2000"])  # fmt: skip
    msg = str(e.value)
    assert "data.n_train=5000 is above the 1293 training examples" in msg
    assert "--set data.n_train=1293" in msg
    assert "finetune.batch_size=2000 is larger than the training set (1293 examples)" in msg
    assert "--set finetune.batch_size=1293" in msg and "pretrain.batch_size" not in msg
    with pytest.raises(ConfigError) as e:
        resolve_config("quick", dataset=str(tmp_path / "d.npz"),
                       sets=["data.n_valid=10000", "pretrain.batch_size=1500"])  # fmt: skip
    msg = str(e.value)  # the n_valid fix (144 rows) leaves 1293 to check the batch against
    assert "data.n_valid=10000 leaves no training data" in msg
    assert "--set data.n_valid=144" in msg and "--set pretrain.batch_size=1293" in msg


def test_named_dataset_sizes_are_checked_without_any_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_config("quick", dataset="mnist-rot", data_dir=tmp_path,
                       sets=["data.n_valid=60000", "data.n_train=null"])  # fmt: skip
    assert "data.n_valid=60000 leaves no training data" in str(e.value)
    assert "--set data.n_valid=10000" in str(e.value)
    assert resolve_config("quick", dataset="kmnist", data_dir=tmp_path).data.n_train == 5000


def test_too_small_dataset_is_refused_before_start_up(tmp_path):
    digits_like(tmp_path / "tiny.npz", n=1, n_test=5)
    home = tmp_path / "home"
    env = {**os.environ, "LAYERWISE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "cli.main", "run", "--preset", "quick",
                           "--dataset", str(tmp_path / "tiny.npz")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tmp_path / 'tiny.npz'} has 1 training row(s): too small for any setting" \
        in proc.stderr and "Fix: give it at least 2" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (home / "mlflow.db").exists()  # no MLflow store, so no run in any state


@pytest.mark.slow  # 50-110 s on 2 busy cores (the shared Prefect start-up excluded)
def test_quick_run_end_to_end_on_a_small_npz(tmp_path, prefect_harness, layerwise_home):
    """`layerwise run --preset quick --dataset small.npz` on 400 training rows."""
    from mlflow.tracking import MlflowClient

    digits_like(tmp_path / "small.npz", n=400, n_test=100)
    uri = f"sqlite:///{layerwise_home}/mlflow.db"
    result = CliRunner().invoke(app, ["run", "--preset", "quick", "--dataset",
                                      str(tmp_path / "small.npz"), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("layerwise").experiment_id,
                                "tags.`layerwise.kind` = 'pipeline'")  # fmt: skip
    assert run.info.status == "FINISHED"
    assert run.data.params["data.n_train"] == "null"  # the preset's 5000: at most
    m = run.data.metrics  # 4 well-separated classes: both twins far below chance (75 %)
    assert m["test/error_pretrained"] < 0.2 and m["test/error_random"] < 0.2

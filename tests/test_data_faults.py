"""Data and registered-model faults: what the preflight finds in a user's file (all at
once, before any MLflow run), what the data stage refuses, and the models that must never
be registered. Each test fails on the code before these faults were fixed."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from config.overrides import resolve_config
from config.stages import DataConfig
from runtime.errors import ConfigError, DataError
from tasks.data import load_data, normalize
from test_preflight import cli, refused  # tests/ is on sys.path (rootdir conftest)

RNG = np.random.default_rng(0)


def npz(path: Path, n: int = 300, d: int = 8, **arrays) -> Path:
    """A small valid .npz (3 classes), with ``arrays`` replacing or (None) removing some."""
    base = {"x_train": RNG.random((n, d), dtype=np.float32), "y_train": np.arange(n) % 3,
            "x_test": RNG.random((60, d), dtype=np.float32), "y_test": np.arange(60) % 3}
    base |= arrays
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def test_the_preflight_reports_every_problem_of_a_small_file_at_once(tmp_path):
    """A 10-row file once needed two rounds of fixes, and the second called label 9 out of
    range for 10 classes."""
    path = npz(tmp_path / "ten.npz", n=9, d=4, y_train=np.arange(9), y_test=np.arange(60) % 10,
               x_valid=RNG.random((3, 4)))
    home = tmp_path / "home"
    err = refused(cli(home, "run", "--preset", "quick", "--dataset", str(path)), home,
                  "4 problems", "x_valid without y_valid",
                  "y_test holds label(s) 9 that y_train never has (y_train's classes: 0..8)",
                  "pretrain.batch_size=20", "finetune.batch_size=20")
    assert "out of range" not in err and "outside" not in err


def test_inf_is_refused_wherever_nan_is():
    for value in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match="finetune.optimizer.lr = .*finite number"):
            resolve_config("quick", sets=[f"finetune.optimizer.lr={value}"])
    with pytest.raises(ConfigError, match="corruption_levels.0 = inf"):
        resolve_config("quick", sets=["pretrain.corruption_levels=[.inf,0.1]"])


BAD = {  # arrays replaced -> texts the one preflight message holds
    "negative": ({"y_train": np.arange(300) % 3 - 1}, ["y_train has negative labels (e.g. -1)"]),
    "fractional": ({"y_train": np.arange(300) % 3 + 0.5}, ["y_train has non-integer labels"]),
    "unseen_test_label": ({"y_test": np.arange(60) % 4}, ["y_test holds label(s) 3"]),
    "no_y_test": ({"y_test": None}, ["missing array(s) y_test"]),
    "unpaired_valid": ({"y_valid": np.zeros(5, int)}, ["has y_valid without x_valid"]),
    "rows": ({"y_train": np.arange(299) % 3}, ["x_train has 300 rows but y_train has 299"]),
    "features": ({"x_test": np.zeros((60, 5))}, ["x_train has 8 features per row, x_test 5"]),
    "nan": ({"x_test": np.where(np.eye(60, 8) > 0, np.nan, 0.5)}, ["x_test has 8 NaN/inf"]),
    "beyond_float32": ({"x_train": RNG.random((300, 8)) * 1e300},
                       ["x_train has 2400 value(s) beyond float32's range"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_the_preflight_finds_what_the_data_stage_would_fail_on(tmp_path, case):
    from preflight.checks import data_shape

    arrays, texts = BAD[case]
    path = npz(tmp_path / f"{case}.npz", **arrays)
    shape, problems = data_shape(str(path))
    assert shape is None and problems, problems
    for text in texts:
        assert any(text in p for p in problems), (text, problems)
    with pytest.raises(DataError):  # and the data stage refuses the same file
        load_data(DataConfig(dataset=str(path)))


def test_every_problem_of_a_file_is_listed_together(tmp_path):
    from preflight.checks import data_shape

    path = npz(tmp_path / "many.npz", y_train=np.arange(300) % 3 - 1,
               x_test=np.full((60, 5), np.nan))
    problems = data_shape(str(path))[1]
    assert len(problems) == 3, problems  # negative labels, NaN, feature count


def test_statistics_that_overflow_float32_are_refused_not_warned():
    x = RNG.random((50, 4)) * 1e300  # float64: the statistics overflow in float32
    with pytest.raises(DataError, match="overflow float32"):
        normalize(x, x, x, "standardize", 0.1)
    with pytest.raises(DataError, match="overflow float32"):
        normalize(x, x, x, "unit", 0.1)


@pytest.mark.parametrize("method", ["unit", "standardize", "zca"])
def test_the_served_model_applies_the_training_guards(tmp_path, method):
    """A training split whose features are constant: training divides by 1, and so must
    the registered model (it divided by 0 and returned NaN)."""
    from models.served import RawPixels

    x_train = np.full((40, 6), 0.25, dtype=np.float32)
    x_test = RNG.random((10, 6), dtype=np.float32)
    xs, stats = normalize(x_train, x_train, x_test, method, 0.1)
    served = RawPixels(method, {k: torch.as_tensor(np.asarray(v, np.float32))
                                for k, v in stats.items()})
    got = served.normalize(torch.from_numpy(x_test))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.from_numpy(xs[2]), rtol=1e-5, atol=1e-5)


class Constant(torch.nn.Module):
    def __init__(self, row: list[float]):
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row.expand(len(x), -1)


def test_a_model_with_non_finite_outputs_or_at_chance_is_not_released():
    from tasks.release import chance_error, release_problem

    x = torch.zeros(6, 3)
    y_train, y_test = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    assert chance_error(y_train, y_test) == (pytest.approx(4 / 6), 0)
    nan = release_problem(Constant([float("nan"), 0.0, 0.0]), x, y_test, y_train, 0.1)
    assert nan and "NaN or inf on 6 of 6 test rows" in nan
    chance = release_problem(Constant([0.9, 0.05, 0.05]), x, y_test, y_train, 0.1)
    assert chance and "66.67 % is not better than chance (66.67 %" in chance
    # the logged error alone is not enough: the served model must beat chance as well
    assert release_problem(Constant([0.9, 0.05, 0.05]), x, y_test, y_train, 0.0)
    single = release_problem(Constant([1.0]), x, torch.zeros(6, dtype=torch.long),
                             torch.zeros(5, dtype=torch.long), 0.0)
    assert single and "0.00 % is not better than chance (0.00 %" in single


def test_degenerate_labels_are_warned_about_and_the_class_set_recorded(tmp_path, capsys):
    path = npz(tmp_path / "37.npz", y_train=np.where(np.arange(300) % 2, 3, 7),
               y_test=np.where(np.arange(60) % 2, 3, 7))
    bundle = load_data(DataConfig(dataset=str(path)))
    assert bundle.n_classes == 8 and bundle.summary()["classes"] == "3, 7"
    out = capsys.readouterr().out
    assert "warning:" in out and "the labels are 3, 7" in out and "8 outputs, 6 of them" in out
    one = npz(tmp_path / "one.npz", y_train=np.zeros(300, int), y_test=np.zeros(60, int))
    assert load_data(DataConfig(dataset=str(one))).summary()["classes"] == "0"
    assert "a single class" in capsys.readouterr().out
    assert load_data(DataConfig(dataset=str(npz(tmp_path / "ok.npz")))).summary()[
        "classes"] == "0..2"


def test_a_nan_in_a_table_is_placed_at_its_row_in_the_file(tmp_path):
    import pandas as pd

    df = pd.DataFrame(RNG.random((40, 3)), columns=["a", "b", "c"])
    df["label"] = np.arange(40) % 2
    df["split"] = ["train"] * 30 + ["test"] * 10
    df.loc[33, "b"] = np.nan  # the 4th test row; the 34th row of the file
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"first at row 33 \(line 35 of the file\), column 'b'"):
        load_data(DataConfig(dataset=str(tmp_path / "t.csv")))


def test_a_directory_or_a_symlink_loop_is_not_called_missing(tmp_path):
    (tmp_path / "d.npz").mkdir()
    os.symlink(tmp_path / "loop.npz", tmp_path / "loop.npz")
    os.symlink(tmp_path / "gone.csv", tmp_path / "dangling.csv")
    cases = {"d.npz": "is a directory, not a file", "loop.npz": "loops back on itself",
             "dangling.csv": f"is a symbolic link to {tmp_path / 'gone.csv'}, which does not"}
    for name, text in cases.items():
        with pytest.raises((DataError, ConfigError)) as exc:
            resolve_config("quick", dataset=str(tmp_path / name))
        assert text in str(exc.value) and "not found" not in str(exc.value)


def test_the_mlflow_ui_command_is_quoted_for_paths_with_spaces():
    from tracking.links import mlflow_ui_command, run_link

    uri = "sqlite:////tmp/my runs/it's/mlflow.db"
    assert shlex.split(mlflow_ui_command(uri))[-1] == uri
    assert mlflow_ui_command(uri) in run_link(uri, "1", "abc")


@pytest.mark.slow
def test_a_single_class_run_finishes_and_registers_nothing(tmp_path):
    """It trained to 0 % error and was registered."""
    import sqlite3

    home = tmp_path / "home"
    path = npz(tmp_path / "one.npz", y_train=np.zeros(300, int), y_test=np.zeros(60, int))
    proc = cli(home, "run", "--preset", "quick", "--dataset", str(path), "--set",
               "model.hidden_sizes=[8]", "--set", "pretrain.corruption_levels=[0.1]", "--set",
               "pretrain.epochs=1", "--set", "finetune.max_epochs=1", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "a single class" in out and "no model registered" in out
    line = next(x for x in out.splitlines() if "not registered:" in x)
    assert "not better than chance (0.00 %" in line
    with sqlite3.connect(home / "mlflow.db") as con:
        assert con.execute("SELECT count(*) FROM model_versions").fetchone() == (0,)
        statuses = {s for (s,) in con.execute("SELECT status FROM runs")}
        params = dict(con.execute("SELECT key, value FROM params WHERE key='data.classes'"))
        metrics = {k for (k,) in con.execute("SELECT key FROM metrics")}
        tags = [v for (v,) in con.execute(
            "SELECT value FROM tags WHERE key='layerwise.not_registered'")]
    assert statuses == {"FINISHED"} and params == {"data.classes": "0"}
    assert "test/error_pretrained" in metrics and tags and "chance" in tags[0]

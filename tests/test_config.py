"""Configuration: presets, overrides, and every bad value rejected before any work starts."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from config.overrides import known_keys, parse_set, resolve_config
from config.stages import PipelineConfig, flatten
from runtime.errors import ConfigError


def test_tutorial_preset_equals_the_reference_field_by_field(tmp_path):
    """docs/references.md: DeepLearningTutorials SdA.py."""
    c = resolve_config("tutorial", data_dir=tmp_path)
    expected = {
        "data.n_valid": 10000, "data.n_train": None, "data.normalization": "unit",
        "model.hidden_sizes": [1000, 1000, 1000], "model.activation": "sigmoid",
        "model.tied_weights": True, "model.init": "tutorial", "model.dropout": 0.0,
        "pretrain.epochs": 15, "pretrain.batch_size": 1, "pretrain.noise": "masking",
        "pretrain.corruption_levels": [0.1, 0.2, 0.3], "pretrain.loss": "cross_entropy",
        "pretrain.optimizer.name": "sgd", "pretrain.optimizer.lr": 0.001,
        "pretrain.optimizer.momentum": 0.0, "pretrain.optimizer.weight_decay": 0.0,
        "finetune.max_epochs": 1000, "finetune.batch_size": 1,
        "finetune.optimizer.name": "sgd", "finetune.optimizer.lr": 0.1,
        "finetune.optimizer.momentum": 0.0, "finetune.early_stopping": "tutorial",
        "finetune.patience_batches": 10, "finetune.patience_increase": 2.0,
        "finetune.improvement_threshold": 0.995,
    }
    flat = flatten(c)
    for key, value in expected.items():
        assert flat[key] == value, key


def test_quick_preset_is_small():
    c = resolve_config("quick")
    assert c.data.n_train == 5000 and c.model.hidden_sizes == [256, 128]
    assert len(c.pretrain.corruption_levels) == 2


def test_overrides_apply_in_order(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  epochs: 4\n  optimizer: {lr: 0.5}\nruntime: {seed: 3}\n")
    c = resolve_config("quick", config_file=cfg,
                       sets=["pretrain.corruption_levels=[0.3, 0.4]", "runtime.seed=5",
                             "finetune.optimizer.name=adam"], seed=9)
    assert c.pretrain.epochs == 4 and c.pretrain.optimizer.lr == 0.5
    assert c.pretrain.optimizer.name == "sgd"  # the file overrode lr only
    assert c.pretrain.corruption_levels == [0.3, 0.4]
    assert c.finetune.optimizer.name == "adam"
    assert c.runtime.seed == 9  # --seed wins over --set


def test_parse_set_types():
    assert parse_set("data.n_train=null") == ("data.n_train", None)
    assert parse_set("model.tied_weights=false") == ("model.tied_weights", False)
    assert parse_set("model.hidden_sizes=[10,20]") == ("model.hidden_sizes", [10, 20])
    assert "pretrain.optimizer.lr" in known_keys()


BAD = [
    (["pretrain.epochs=0"], "pretrain.epochs = 0"),
    (["finetune.max_epochs=-1"], "finetune.max_epochs = -1"),
    (["pretrain.optimizer.lr=0"], "pretrain.optimizer.lr = 0"),
    (["finetune.optimizer.lr=-0.1"], "finetune.optimizer.lr = -0.1"),
    (["pretrain.batch_size=0"], "pretrain.batch_size = 0"),
    (["pretrain.corruption_levels=[0.1,1.0]"], "corruption_levels[1] = 1.0 is outside [0, 1)"),
    (["pretrain.corruption_levels=[-0.1,0.2]"], "is outside [0, 1)"),
    (["model.hidden_sizes=[]", "pretrain.corruption_levels=[]"], "model.hidden_sizes"),
    (["model.hidden_sizes=[10,0]"], "hidden_sizes[1] = 0"),
    (["model.hidden_sizes=[10,10,10]"], "corruption_levels has 2 entries"),
    (["model.activation=swish"], "model.activation = 'swish'"),
    (["pretrain.noise=pink"], "pretrain.noise = 'pink'"),
    (["model.init=orthogonal"], "model.init = 'orthogonal'"),
    (["finetune.optimizer.name=rmsprop"], "finetune.optimizer.name = 'rmsprop'"),
    (["data.normalization=standardize"], "cross_entropy' needs inputs in [0,1]"),
    (["data.normalization=zca"], "normalization='unit'"),
    (["model.activation=relu"], "needs codes in [0,1]"),
    (["finetune.batch_size=5001"], "finetune.batch_size=5001 is larger than the training set"),
    (["data.n_train=50001"], "data.n_train=50001 is above the 50000"),
    (["pretrain.lrr=1"], "--set pretrain.lrr: unknown key"),
]


@pytest.mark.parametrize("sets,message", BAD)
def test_bad_values_name_the_field_value_and_range(sets, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("quick", sets=sets)
    assert message in str(info.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve_config("huge")


def test_npz_batch_size_is_checked_from_the_header(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((300, 4)), y_train=rng.integers(0, 2, 300),
             x_test=rng.random((50, 4)), y_test=rng.integers(0, 2, 50))
    ok = resolve_config("quick", dataset=str(path), sets=["data.n_valid=100", "data.n_train=null"])
    assert ok.data.dataset == str(path)
    with pytest.raises(ConfigError, match="larger than the training set \\(200 examples\\)"):
        resolve_config("quick", dataset=str(path), sets=[
            "data.n_valid=100", "data.n_train=null", "finetune.batch_size=201"])


def test_cli_rejects_bad_config_before_any_run_is_created(layerwise_home):
    result = CliRunner().invoke(app, ["run", "--preset", "quick", "--set", "pretrain.epochs=0"])
    assert result.exit_code == 2
    assert "pretrain.epochs = 0" in result.output
    assert not layerwise_home.exists()  # no MLflow store, no checkpoints, nothing written


def test_config_roundtrips_through_json():
    c = resolve_config("default")
    assert PipelineConfig.model_validate_json(c.model_dump_json()) == c
    assert c.digest() == PipelineConfig.model_validate_json(c.model_dump_json()).digest()


KEY_SCRIPT = """
from config.stages import PipelineConfig
from tasks.pretrain import LayerResult, pretrain_cache_key
from tasks.finetune import finetune_cache_key
c = PipelineConfig.model_validate({"model": {"hidden_sizes": [8, 4]},
                                   "pretrain": {"corruption_levels": [0.1, 0.2]}})
print(pretrain_cache_key(1, c, "d" * 64, []), finetune_cache_key("random", c, "d" * 64, None))
"""


def test_stage_keys_do_not_depend_on_where_the_code_lives_or_runs(tmp_path):
    """A copy of the package at another root, with a module moved into a subpackage (the old
    path re-exports it), run from another working directory, computes the same cache keys:
    moving the checkout or a file in it neither changes nor breaks resuming."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    moved = tmp_path / "elsewhere" / "checkout"
    for package in sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file()):
        shutil.copytree(root / package, moved / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (moved / "models" / "nets").mkdir()
    (moved / "models" / "nets" / "__init__.py").write_text("")
    (moved / "models" / "dae.py").rename(moved / "models" / "nets" / "dae.py")
    (moved / "models" / "dae.py").write_text("from models.nets.dae import *  # noqa: F403\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    keys = [subprocess.run([sys.executable, "-c", KEY_SCRIPT], cwd=where, text=True,
                           capture_output=True, check=True,
                           env={**__import__("os").environ, "PYTHONPATH": str(src)}).stdout
            for where, src in ((root, root), (cwd, moved))]
    assert keys[0] == keys[1] and len(keys[0].split()) == 2


def test_a_stage_key_changes_with_its_kind_version_only(monkeypatch):
    from runtime import keys

    before = {kind: keys.stage_key("s", kind=kind, x=1) for kind in keys.STAGE_VERSIONS}
    monkeypatch.setitem(keys.STAGE_VERSIONS, "pretrain", keys.STAGE_VERSIONS["pretrain"] + 1)
    after = {kind: keys.stage_key("s", kind=kind, x=1) for kind in keys.STAGE_VERSIONS}
    assert before["pretrain"] != after["pretrain"]
    assert {k: v for k, v in before.items() if k != "pretrain"} == {
        k: v for k, v in after.items() if k != "pretrain"}
    assert keys.stage_key("s", kind="finetune", x=1) != keys.stage_key("s", kind="finetune", x=2)

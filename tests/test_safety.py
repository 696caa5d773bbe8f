"""Safety: no pickle on load, no path escapes, no secrets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from runtime.checkpoints import Checkpoint, file_sha256, load_state, save_state
from runtime.errors import CheckpointError
from tracking.tracker import safe_artifact_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad", ["../x.json", "a/../../b", "/etc/passwd", "a//b", "",
                                 "C:/x", "a\\..\\b", "a\x00b", "figures/.."])
def test_artifact_paths_cannot_escape(bad):
    with pytest.raises(ValueError, match="unsafe artifact path"):
        safe_artifact_path(bad)


@pytest.mark.parametrize("good", ["figures", "evaluation/summary.json", "data", "a.b/c-d_e"])
def test_ordinary_artifact_paths_pass(good):
    assert safe_artifact_path(good) == good


def test_tracker_refuses_an_escaping_artifact_name(tmp_path):
    from tracking.tracker import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "safety")
    with pytest.raises(ValueError, match="unsafe"):
        with tracker.run("r", {}) as run:
            tracker.log_dict(run, {"a": 1}, "../../../outside.json")
    assert not list(tmp_path.parent.rglob("outside.json"))
    (run,) = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == "FAILED"


def test_checkpoints_are_safetensors_and_verified(tmp_path):
    ckpt = save_state({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "c.safetensors")
    assert ckpt.sha256 == file_sha256(tmp_path / "c.safetensors")
    assert torch.equal(load_state(ckpt)["w"], torch.arange(6.0).reshape(2, 3))
    data = bytearray((tmp_path / "c.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="expected .*--fresh"):
        load_state(ckpt)
    with pytest.raises(CheckpointError, match="missing"):
        load_state(Checkpoint(path=tmp_path / "nope.safetensors", sha256="0" * 64))
    assert not list(tmp_path.glob("*.tmp"))


def test_no_pickle_loading_in_the_code():
    """Weights are read with safetensors only; nothing calls torch.load or pickle.load."""
    for path in [*REPO.glob("models/*.py"), *REPO.glob("tasks/*.py"), *REPO.glob("flows/*.py")]:
        text = path.read_text()
        assert "torch.load(" not in text or "weights_only=True" in text, path
        assert "pickle.load" not in text, path


PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def test_secret_patterns_catch_what_they_are_for():
    assert PRIVATE_KEY.search("x\n-----BEGIN RSA PRIVATE" + " KEY-----\nMIIE")
    assert AWS_KEY_ID.search("key = " + "AKIA" + "IOSFODNN7EXAMPLE")
    assert not AWS_KEY_ID.search("AKIA is a prefix")


def test_no_secrets_are_committed():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    assert ".env" not in files
    for name in files:
        path = REPO / name
        if path.suffix in {".py", ".yml", ".yaml", ".toml", ".md", ".example", ""} and path.is_file():
            text = path.read_text(errors="ignore")
            # The patterns are written so that this file does not match itself.
            assert not PRIVATE_KEY.search(text), f"{name} holds a private key"
            assert not AWS_KEY_ID.search(text), f"{name} holds an AWS access key id"

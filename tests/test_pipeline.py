"""End to end: the ``quick`` preset through Prefect, Lightning and MLflow, and its resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from config.overrides import resolve_config
from runtime.precision import resolve_precision

STAGES = {"load-data", "pretrain-layer-1", "pretrain-layer-2", "finetune-pretrained",
          "finetune-random", "evaluate"}


@pytest.fixture(scope="module")
def quick_run(shared_data_dir, prefect_harness, tmp_path_factory):
    """One real ``quick`` run into a temporary SQLite store, shared by this module's tests."""
    from flows.pipeline import run_pipeline

    home = tmp_path_factory.mktemp("quick")
    mp = pytest.MonkeyPatch()
    mp.setenv("LAYERWISE_HOME", str(home))
    config = resolve_config("quick", data_dir=shared_data_dir)
    uri = f"sqlite:///{home}/mlflow.db"
    result = run_pipeline(config, preset="quick", tracking_uri=uri, experiment="e2e",
                          registered_model_name="e2e-classifier")
    yield config, result, uri
    mp.undo()


@pytest.fixture(scope="module")
def client(quick_run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(quick_run[2])


def _children(client, result):
    runs = client.search_runs([result.experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}'")
    return {r.data.tags["layerwise.stage"]: r for r in runs}


def test_parent_and_child_runs_are_tagged_and_finished(quick_run, client):
    _, result, _ = quick_run
    parent = client.get_run(result.run_id)
    assert parent.data.tags["layerwise.kind"] == "pipeline"
    assert parent.info.status == "FINISHED"
    children = _children(client, result)
    assert set(children) == STAGES
    assert {r.info.status for r in children.values()} == {"FINISHED"}


def test_params_record_config_data_and_environment(quick_run, client):
    config, result, _ = quick_run
    params = client.get_run(result.run_id).data.params
    assert params["preset"] == "quick"
    assert params["model.hidden_sizes"] == "[256, 128]"
    assert params["pretrain.corruption_levels"] == "[0.1, 0.2]"
    assert params["pretrain.optimizer.lr"] == str(config.pretrain.optimizer.lr)
    assert params["finetune.early_stopping"] == config.finetune.early_stopping
    assert params["data.digest"] == result.data["digest"] and len(params["data.digest"]) == 64
    for key in ("git.commit", "version.torch", "version.lightning", "version.prefect",
                "version.mlflow", "device"):
        assert params[key] not in ("", None)
    assert params["version.torch"] == torch.__version__
    # the precision asked for and the one trained in (auto resolved for this machine)
    assert params["runtime.precision"] == config.runtime.precision == "auto"  # the default
    assert params["runtime.precision_used"] == resolve_precision("auto", "cpu")
    assert params["runtime.precision_used"] in ("bf16-mixed", "32-true")


def test_metrics_are_fractions_and_consistent(quick_run, client):
    _, result, _ = quick_run
    m = client.get_run(result.run_id).data.metrics
    assert 0 <= m["test/error_pretrained"] <= 1 and 0 <= m["test/error_random"] <= 1
    assert m["test/error_diff"] == pytest.approx(m["test/error_pretrained"]
                                                 - m["test/error_random"])
    # The bar for the quick preset.
    assert m["test/error_pretrained"] < 0.10 and m["test/error_random"] < 0.10


def test_metric_histories_have_one_point_per_epoch(quick_run, client):
    config, result, _ = quick_run
    children = _children(client, result)
    for k in (1, 2):
        run = children[f"pretrain-layer-{k}"].info.run_id
        for name in ("recon_loss", "val_recon_loss"):
            hist = client.get_metric_history(run, f"pretrain/layer_{k}/{name}")
            assert [h.step for h in hist] == list(range(config.pretrain.epochs))
        train = [h.value for h in client.get_metric_history(run, f"pretrain/layer_{k}/recon_loss")]
        assert train[-1] < train[0], "pretraining did not lower the reconstruction loss"
    for arm in ("pretrained", "random"):
        run = children[f"finetune-{arm}"]
        assert run.data.tags["layerwise.arm"] == arm  # both arms log the same keys
        epochs = int(run.data.metrics["finetune/epochs_run"])
        for name in ("train_loss", "val_error", "val_loss", "train_error"):
            hist = client.get_metric_history(run.info.run_id, f"finetune/{name}")
            assert [h.step for h in hist] == list(range(epochs))
        val = [h.value for h in client.get_metric_history(run.info.run_id,
                                                          "finetune/val_error")]
        assert min(val) == pytest.approx(run.data.metrics["finetune/best_val_error"])


def test_every_artifact_decodes(quick_run, client, tmp_path):
    _, result, _ = quick_run
    children = _children(client, result)
    import mlflow

    def files(run_id, path):
        return {f.path for f in client.list_artifacts(run_id, path)}

    for k in (1, 2):
        run = children[f"pretrain-layer-{k}"].info.run_id
        assert files(run, "figures") == {f"figures/{n}_layer_{k}.png"
                                         for n in ("filters", "corrupted", "reconstruction")}
        assert files(run, "weights") == {"weights/dae.safetensors"}
    evaluate = children["evaluate"].info.run_id
    names = files(evaluate, "evaluation")
    expected = {"confusion_pretrained.png", "confusion_pretrained.csv", "confusion_random.png",
                "confusion_random.csv", "learning_curves.png", "summary.json"}
    assert names == {f"evaluation/{n}" for n in expected}
    local = mlflow.artifacts.download_artifacts(run_id=evaluate, tracking_uri=quick_run[2],
                                                dst_path=str(tmp_path))
    for png in tmp_path.rglob("*.png"):
        with Image.open(png) as img:
            img.load()
            assert img.size[0] > 50 and img.size[1] > 50
    cm = pd.read_csv(f"{local}/evaluation/confusion_pretrained.csv", index_col=0).to_numpy()
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    errors = 1 - np.trace(cm) / cm.sum()
    assert errors == pytest.approx(result.test_error_pretrained)
    filt = mlflow.artifacts.download_artifacts(
        run_id=children["pretrain-layer-1"].info.run_id, artifact_path="figures/filters_layer_1.png",
        tracking_uri=quick_run[2], dst_path=str(tmp_path / "f"))
    with Image.open(filt) as img:
        # 10×10 tiles, each about 3× the tutorial's 28 px, with a title and a colour bar
        assert img.size[0] >= 2 * 289 and img.size[1] >= 2 * 289


def test_registered_model_reproduces_logged_test_error(quick_run, shared_data_dir):
    import mlflow.pytorch

    config, result, uri = quick_run
    from sources.read import raw_test_features
    from tasks.data import load_data
    from tasks.release import as_inputs

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/e2e-classifier/{result.model_version}")
    data = load_data(config.data)
    raw = torch.from_numpy(as_inputs(raw_test_features(config.data)))  # (10000, 784) pixels in 0-255
    assert raw.max() == 255  # the model normalises them itself
    with torch.no_grad():
        pred = model(raw).argmax(dim=1)
    error = int((pred != data.y_test).sum()) / len(data.y_test)
    assert error == result.test_error_pretrained
    from mlflow.tracking import MlflowClient

    version = MlflowClient(uri).get_model_version("e2e-classifier", result.model_version)
    assert version.tags["layerwise.run_id"] == result.run_id


def test_pretrained_weights_reach_the_classifier(quick_run, client):
    """The pretrained arm starts from the encoders; the random arm does not."""
    _, result, _ = quick_run
    children = _children(client, result)
    import json

    encoders = [children[f"pretrain-layer-{k}"].data.params["encoder.sha256"] for k in (1, 2)]
    pre = json.loads(children["finetune-pretrained"].data.params["initial_hidden_sha256"])
    rnd = json.loads(children["finetune-random"].data.params["initial_hidden_sha256"])
    assert pre == encoders
    assert not set(rnd) & set(encoders)


def test_identical_rerun_comes_from_cache_with_a_complete_record(quick_run, client):
    from flows.pipeline import run_pipeline

    config, first, uri = quick_run
    import os

    assert os.environ["LAYERWISE_HOME"]  # the module fixture's store is still in force
    again = run_pipeline(config, preset="quick", tracking_uri=uri, experiment="e2e",
                         registered_model_name="e2e-classifier")
    cached = {s.name: s.cached for s in again.stages}
    assert cached == {"load-data": False, "pretrain-layer-1": True, "pretrain-layer-2": True,
                      "finetune-pretrained": True, "finetune-random": True, "evaluate": False}
    assert again.test_error_pretrained == first.test_error_pretrained
    assert again.run_id != first.run_id
    assert set(_children(client, again)) == STAGES
    hist = client.get_metric_history(_children(client, again)["finetune-random"].info.run_id,
                                     "finetune/val_error")
    assert len(hist) >= 1


def test_resume_after_a_failed_finetune(shared_data_dir, prefect_harness, layerwise_home,
                                        monkeypatch):
    """A crash in finetune-pretrained leaves FAILED runs; the rerun resumes from cache."""
    from mlflow.tracking import MlflowClient

    import tasks.finetune
    from flows.pipeline import run_pipeline

    config = resolve_config("quick", data_dir=shared_data_dir, sets=[
        "data.n_train=1000", "model.hidden_sizes=[64,32]", "pretrain.epochs=1",
        "finetune.max_epochs=1"])
    uri = f"sqlite:///{layerwise_home}/mlflow.db"
    real = tasks.finetune.finetune_members

    def broken(arms, *args, **kwargs):
        if "pretrained" in arms:
            raise RuntimeError("injected failure")
        return real(arms, *args, **kwargs)

    monkeypatch.setattr(tasks.finetune, "finetune_members", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pipeline(config, preset="quick", tracking_uri=uri, experiment="resume")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id])
    status = {r.data.tags.get("layerwise.stage", "parent"): r.info.status for r in runs}
    assert status == {"parent": "FAILED", "load-data": "FINISHED",
                      "pretrain-layer-1": "FINISHED", "pretrain-layer-2": "FINISHED",
                      "finetune-pretrained": "FAILED", "finetune-random": "FAILED"}

    monkeypatch.setattr(tasks.finetune, "finetune_members", real)
    result = run_pipeline(config, preset="quick", tracking_uri=uri, experiment="resume")
    cached = {s.name: s.cached for s in result.stages}
    assert cached["pretrain-layer-1"] and cached["pretrain-layer-2"]
    assert not cached["finetune-pretrained"]
    assert client.get_run(result.run_id).info.status == "FINISHED"

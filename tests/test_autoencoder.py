"""The deep autoencoder (objective 'reconstruct'): the unrolled decoder mirrors the encoder,
PCA's error is the discarded variance, both arms read the same data order, k-NN votes as
counted by hand, and one tiny run end to end whose registered autoencoder reproduces its
logged test error from raw pixels."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from config.overrides import resolve_config
from models.autoencoder import AutoencoderPopulation, single, unrolled_state
from models.dae import DenoisingAutoencoder
from runtime.errors import ConfigError
from tasks.pretrain import pretrain_cache_key
from tasks.reconstruct import activations, initial_state
from tasks.reconstruct_eval import knn_accuracy, pca_decode, pca_encode, pca_fit

TINY = ["data.n_train=1000", "data.n_valid=2000", "model.hidden_sizes=[32,8]",
        "pretrain.corruption_levels=[0.1,0.0]", "pretrain.epochs=1", "finetune.max_epochs=1"]


def _daes(sizes, tied, seed=0):
    g = torch.Generator().manual_seed(seed)
    daes = [DenoisingAutoencoder(sizes[l], sizes[l + 1], tied=tied, generator=g)
            for l in range(len(sizes) - 1)]
    for dae in daes:  # non-zero decoder biases, so that copying them is visible
        torch.nn.init.uniform_(dae.b_prime, -1, 1, generator=g)
    return [dae.state_dict() for dae in daes]


@pytest.mark.parametrize("pretrain_tied", [True, False])
@pytest.mark.parametrize("tied_decoder", [True, False])
def test_unrolled_decoder_mirrors_the_pretrained_encoders(pretrain_tied, tied_decoder):
    """At the start of fine-tuning decoder l is dA l's decoder: W'_l = W_lᵀ (tied dA, or a
    tied decoder) or the dA's own W'_l (untied dA, untied decoder), b'_l its visible bias;
    the encoder is the dA's encoder."""
    config = resolve_config("ae-small", sets=["model.hidden_sizes=[6,3]",
                                              "pretrain.corruption_levels=[0.1,0.0]",
                                              f"autoencoder.tied_decoder={tied_decoder}"])
    daes = _daes([10, 6, 3], pretrain_tied)
    state = initial_state("pretrained", config, 10, daes)
    pop = AutoencoderPopulation([state], activations(config), "cross_entropy")
    for l, dae in enumerate(daes):
        w = dae["encoder.linear.weight"]
        assert torch.equal(pop.enc_w[l][0], w)
        assert torch.equal(pop.enc_b[l][0], dae["encoder.linear.bias"])
        assert torch.equal(pop.dec_b[l][0], dae["b_prime"])
        expected = w.t() if pretrain_tied or tied_decoder else dae["W_prime"]
        assert torch.equal(pop.decoder_weight(l)[0], expected)
    assert ("decoder.0.weight" in state) is (not tied_decoder)
    if tied_decoder:  # shared, not copied: a change to W_l is a change to W'_l
        with torch.no_grad():
            pop.enc_w[0][0, 0, 1] += 1.0
        assert pop.decoder_weight(0)[0, 1, 0] == pop.enc_w[0][0, 0, 1]


def test_one_layer_unrolled_autoencoder_is_its_dae():
    """Unrolled from one tied dA, the autoencoder's reconstruction is the dA's:
    z = σ(Wᵀ σ(W x + b) + b')."""
    torch.manual_seed(0)
    dae = DenoisingAutoencoder(12, 5, tied=True, generator=torch.Generator().manual_seed(1))
    net = single(unrolled_state([dae.state_dict()], tied=True), ["sigmoid"], "cross_entropy")
    x = torch.rand(7, 12)
    with torch.no_grad():
        by_hand = torch.sigmoid(torch.sigmoid(x @ dae.encoder.W.t()) @ dae.encoder.W)
        assert torch.allclose(net.decode(net.encode(x))[0], by_hand, atol=1e-6)
        assert torch.allclose(net.decode(net.encode(x))[0], dae.decode(dae.encode(x)))


def test_pca_error_is_the_sum_of_the_discarded_eigenvalues():
    """Six points ±3·e1, ±2·e2, ±1·e3, rotated: mean 0, covariance eigenvalues 9/3, 4/3,
    1/3. Keeping one component, ±3·e1 reconstruct exactly and the others lose all of
    themselves: squared error per example (0 + 0 + 4 + 4 + 1 + 1)/6 = 5/3 = 4/3 + 1/3."""
    base = torch.tensor([[3., 0, 0], [-3, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 1], [0, 0, -1]])
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    x = base.double() @ q.t() + torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    mean, components, eigenvalues = pca_fit(x, 1)
    assert torch.allclose(eigenvalues, torch.tensor([3., 4 / 3, 1 / 3], dtype=torch.float64))
    z = pca_decode(pca_encode(x, mean, components), mean, components)
    error = ((x - z) ** 2).sum(dim=1).mean()
    assert math.isclose(float(error), 5 / 3, rel_tol=1e-12)
    assert math.isclose(float(error), float(eigenvalues[1:].sum()), rel_tol=1e-12)


def test_knn_vote_counted_by_hand():
    """Train codes at 0, 1, 2 (class 0) and 10, 11 (class 1). k = 3: a query at 9 has
    neighbours 10, 11, 2 -> class 1 (2 votes to 1); at 1.4: 1, 2, 0 -> class 0; at 6
    (neighbours 2, 10, 11 -> class 1) labelled 0 is wrong: accuracy 2/3."""
    train = torch.tensor([[0.], [1.], [2.], [10.], [11.]])
    y_train = torch.tensor([0, 0, 0, 1, 1])
    test, y_test = torch.tensor([[9.], [1.4], [6.]]), torch.tensor([1, 0, 0])
    assert knn_accuracy(train, y_train, test, y_test, k=3) == pytest.approx(2 / 3)
    assert knn_accuracy(train, y_train, test, y_test, k=1) == pytest.approx(2 / 3)


def test_both_arms_read_the_same_data_order(monkeypatch, tmp_path):
    """Every optimiser step gives the pretrained and the random arm the same rows."""
    import tasks.reconstruct as reconstruct
    from training.autoencoder_training import AutoencoderSystem

    config = resolve_config("ae-small", sets=[
        "model.hidden_sizes=[8,2]", "pretrain.corruption_levels=[0.1,0.0]",
        "finetune.max_epochs=2", "finetune.batch_size=10", "finetune.early_stopping=none",
        "runtime.accelerator=cpu"])
    monkeypatch.setattr(reconstruct, "load_stack", lambda encoders: _daes([16, 8, 2], True))
    seen = []
    step = AutoencoderSystem.batch_step

    def spy(self, idx):
        seen.append(idx.clone())
        return step(self, idx)

    monkeypatch.setattr(AutoencoderSystem, "batch_step", spy)
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(x_train=torch.rand(60, 16, generator=g),
                           x_valid=torch.rand(20, 16, generator=g), n_features=16)
    twins = reconstruct.finetune_autoencoders(config, data, [None, None], tmp_path)
    assert len(seen) == 2 * 6 and all(idx.shape == (2, 10) for idx in seen)
    assert all(torch.equal(idx[0], idx[1]) for idx in seen)
    assert not torch.equal(torch.cat([i[0] for i in seen[:6]]), torch.arange(60))  # shuffled
    assert twins.arms["pretrained"].initial_hidden_sha256 != \
        twins.arms["random"].initial_hidden_sha256
    assert len(twins.arms["random"].history) == 2


def test_pretrained_layers_are_shared_with_the_classifier_pipeline():
    """Layers below the code have the classifier's cache keys; a linear code layer is
    pretrained linear, so it has its own key (the same as classify's with a 'hidden' code)."""
    sets = ["model.hidden_sizes=[32,8]", "pretrain.corruption_levels=[0.1,0.2]"]
    classify = resolve_config("quick", sets=sets)
    linear = resolve_config("quick", sets=[*sets, "objective=reconstruct"])
    hidden = resolve_config("quick", sets=[*sets, "objective=reconstruct",
                                           "autoencoder.code_activation=hidden"])
    keys = {name: [pretrain_cache_key(k, c, "d", []) for k in range(2)]
            for name, c in (("classify", classify), ("linear", linear), ("hidden", hidden))}
    assert keys["linear"][0] == keys["classify"][0] == keys["hidden"][0]
    assert keys["hidden"][1] == keys["classify"][1] != keys["linear"][1]
    assert activations(linear) == ["sigmoid", "linear"]


@pytest.mark.parametrize("sets, words", [
    (["data.normalization=standardize", "pretrain.loss=squared_error"],
     "normalization='unit'"),
    (["model.dropout=0.5"], "model.dropout=0"),
    (["objective=regress"], "objective"),
])
def test_bad_reconstruct_settings_are_named(sets, words):
    with pytest.raises(ConfigError) as err:
        resolve_config("ae-small", sets=sets)
    assert words in str(err.value)


def test_tiny_reconstruct_run_end_to_end(shared_data_dir, prefect_harness, layerwise_home):
    """One tiny run (1000 examples, 1 epoch, 784-32-8): the parent holds every method's
    metrics, each arm its own run with per-epoch history, and the registered autoencoder,
    fed raw 0-255 test pixels, reproduces the logged squared error per test image."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from mlflow.tracking import MlflowClient
    from torchvision.datasets import MNIST

    from flows.pipeline import run_pipeline

    config = resolve_config("ae-small", data_dir=shared_data_dir, sets=TINY)
    uri = f"sqlite:///{layerwise_home}/mlflow.db"
    result = run_pipeline(config, preset="ae-small", tracking_uri=uri, experiment="ae",
                          registered_model_name="ae-test", encoder_model_name="ae-test-enc")
    assert [s.name for s in result.stages] == [
        "load-data", "pretrain-layer-1", "pretrain-layer-2", "finetune-pretrained",
        "finetune-random", "evaluate"]
    client = MlflowClient(uri)
    metrics = client.get_run(result.run_id).data.metrics
    for method in ("pretrained", "random", "pca"):
        assert metrics[f"test/recon_error_{method}"] == result.recon_error[method] > 0
        assert 0.1 < metrics[f"test/knn_accuracy_{method}"] <= 1
    arm_runs = {r.data.tags["layerwise.arm"]: r for r in client.search_runs(
        [result.experiment_id], "tags.`layerwise.arm` != ''")}
    assert set(arm_runs) == {"pretrained", "random"}
    for arm, run in arm_runs.items():
        history = client.get_metric_history(run.info.run_id, "finetune/val_sq_error_per_image")
        assert len(history) == 1 and history[0].value == run.data.metrics[
            "finetune/best_val_error"]
        assert "finetune/train_sq_error_per_image" in run.data.metrics

    mlflow.set_tracking_uri(uri)
    version = result.model_versions["ae-test"]
    model = mlflow.pyfunc.load_model(f"models:/ae-test/{version}")
    test = MNIST(root=shared_data_dir, train=False, download=False)
    raw = test.data.reshape(len(test.data), 784).numpy().astype(np.float32)  # 0-255
    z = model.predict(raw)
    assert z.shape == (10000, 784) and 0 <= z.min() and z.max() <= 255
    error = float((((raw - z) / 255.0).astype(np.float64) ** 2).sum(axis=1).mean())
    assert error == pytest.approx(metrics["test/recon_error_pretrained"], rel=1e-5)
    mv = client.get_model_version("ae-test", version)
    assert float(mv.tags["test_error"]) == metrics["test/recon_error_pretrained"]
    assert float(mv.tags["val_error"]) == metrics["valid/error_pretrained"]
    encoder = mlflow.pyfunc.load_model(
        f"models:/ae-test-enc/{result.model_versions['ae-test-enc']}")
    assert encoder.predict(raw[:3]).shape == (3, 8)
    figures = {Path(a.path).name for a in client.list_artifacts(
        [r for r in client.search_runs([result.experiment_id],
                                       "tags.`layerwise.stage` = 'evaluate'")][0].info.run_id,
        "evaluation")}
    assert {"reconstructions.png", "learning_curves.png"} <= figures


def test_objective_is_a_grid_factor():
    """ae-tiny: {classify, reconstruct} × {pretrained, random} × 2 seeds; each cell's config
    has its objective, every row names it, and the reconstruct cells keep a linear code."""
    from config.grid import GRIDS_DIR, expand, load_grid

    cells = expand(load_grid(GRIDS_DIR / "ae-tiny.yaml"))
    assert len(cells) == 8
    by_objective = {o: [c for c in cells if c.config.objective == o]
                    for o in ("classify", "reconstruct")}
    assert all(len(v) == 4 for v in by_objective.values())
    assert all(c.factors["objective"] == c.config.objective for c in cells)
    assert {activations(c.config)[-1] for c in by_objective["reconstruct"]} == {"linear"}
    assert {activations(c.config)[-1] for c in by_objective["classify"]} == {"sigmoid"}
    depth = expand(load_grid(GRIDS_DIR / "ae-depth.yaml"))
    assert {tuple(c.config.model.hidden_sizes) for c in depth} == {(128, 2), (256, 64, 2)}
    assert {c.factors["objective"] for c in depth} == {"reconstruct"}


def test_summary_shows_reconstruct_errors_in_their_own_units():
    """A reconstruct row's 12.5 stays 12.500; a classify row's 0.125 is 12.50 %."""
    import pandas as pd

    from reports.ablation_outputs import format_summary, progress_line

    nan = float("nan")
    summary = pd.DataFrame({
        "objective": ["classify", "reconstruct"], "init": ["pretrained"] * 2, "n": [2, 2],
        "n_failed": [0, 0], "mean": [0.125, 12.5], "std": [0.01, 1.0], "median": [0.125, 12.5],
        "ci_low": [0.1, 12.0], "ci_high": [0.15, 13.0], "diff_mean": [-0.01, -3.25],
        "diff_ci_low": [nan, -4.0], "diff_ci_high": [nan, -2.5], "n_pairs": [2, 2],
        "p_wilcoxon": [0.5, 0.5], "p_welch": [0.5, 0.5], "bf_stat": [nan, 1.5],
        "p_brown_forsythe": [nan, 0.25]})
    text = format_summary(summary, ["objective"], 0.95)
    classify, reconstruct = text.splitlines()[1:3]
    assert "12.50" in classify and " % " in f" {classify} " and "-1.00" in classify
    assert "12.500" in reconstruct and "sq/img" in reconstruct and "[-4.000, -2.500]" in reconstruct
    row = {"status": "ok", "objective": "reconstruct", "test_error": 12.5, "cached": False,
           "cell": "c"}
    assert "12.500 sq. error/image" in progress_line(1, 1, row)


@pytest.mark.slow
def test_ae_tiny_ablation_runs_both_objectives(shared_data_dir, prefect_harness, tmp_path,
                                               monkeypatch):
    """The ae-tiny grid end to end: every cell finishes; the reconstruct cells' errors are
    squared errors per image (tens), the classify cells' fractions."""
    import pandas as pd

    from config.grid import GRIDS_DIR, customise, load_grid
    from flows.ablation import run_ablation

    monkeypatch.setenv("LAYERWISE_HOME", str(tmp_path / "home"))
    grid = customise(load_grid(GRIDS_DIR / "ae-tiny.yaml"), data_dir=shared_data_dir)
    result = run_ablation(grid, out_dir=tmp_path / "out", verbose=False,
                          tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="ae-tiny")
    table = pd.read_parquet(result.out_dir / "cells.parquet")
    assert result.n_ok == 8 and set(table.objective) == {"classify", "reconstruct"}
    errors = table.set_index("objective").test_error
    assert (errors["classify"] < 1).all() and (errors["reconstruct"] > 5).all()
    assert "sq/img" in result.summary_text

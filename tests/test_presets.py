"""Every paper preset, and every classification preset under ``--objective reconstruct``,
trains: one epoch per stage on a slice of MNIST, big enough that the learning rates that
diverged did so within it (``hinton2006``'s linear code layer at step 50 of 5,000 images,
``quick``'s at step 250). ``make test-slow``."""

from __future__ import annotations

import math

import pytest

from config.overrides import resolve_config
from config.presets import PRESETS

SLICE = ["data.n_train=5000", "pretrain.epochs=1", "finetune.max_epochs=1"]
CASES = [("tutorial", None), ("hinton2006", None),
         *[(name, "reconstruct") for name, p in PRESETS.items()
           if p.get("objective", "classify") == "classify"]]


@pytest.mark.slow
@pytest.mark.parametrize("preset,objective", CASES, ids=[f"{p}-{o or 'own'}" for p, o in CASES])
def test_the_preset_trains_one_epoch_per_stage(preset, objective, shared_data_dir,
                                               prefect_harness, layerwise_home):
    from flows.pipeline import run_pipeline

    sets = SLICE + ([f"objective={objective}"] if objective else [])
    config = resolve_config(preset, data_dir=shared_data_dir, sets=sets)
    result = run_pipeline(config, tracking_uri=f"sqlite:///{layerwise_home}/mlflow.db",
                          experiment="presets", preset=preset)
    if config.objective == "reconstruct":  # the squared error per image of each method
        errors = result.recon_error
        assert set(errors) >= {"pretrained", "random", "pca"}
    else:
        errors = {"pretrained": result.test_error_pretrained,
                  "random": result.test_error_random}
    assert all(math.isfinite(v) for v in errors.values()), errors

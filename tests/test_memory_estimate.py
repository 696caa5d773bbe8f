"""The peak-memory estimate by hand, and the preflight's name rules against MLflow's own."""

from __future__ import annotations

import pytest

from preflight.memory import (BASE_BYTES, Shape, classifier_params, dae_params,
                              largest_width_that_fits, memory_problem, peak_bytes)
from preflight.checks import name_problems
from config.stages import PipelineConfig


def _config(**sections) -> PipelineConfig:
    tree = {"model": {"hidden_sizes": [3, 2]},
            "pretrain": {"batch_size": 5, "corruption_levels": [0.1, 0.1],
                         "optimizer": {"name": "sgd", "momentum": 0.5}},
            "finetune": {"batch_size": 4, "optimizer": {"name": "adam"}},
            "runtime": {"eval_batch_size": 7}}
    for key, value in sections.items():
        tree[key] = {**tree[key], **value}
    return PipelineConfig.model_validate(tree)


def test_parameter_counts_by_hand():
    # 4 -> 3 -> 2 -> 5 classes: (4*3+3) + (3*2+2) + (2*5+5) = 15 + 8 + 15
    assert classifier_params(4, [3, 2], 5) == 38
    assert dae_params(4, 3, tied=True) == 4 * 3 + 4 + 3
    assert dae_params(4, 3, tied=False) == 2 * 4 * 3 + 4 + 3


def test_peak_bytes_by_hand():
    shape = Shape(n_rows=10, n_features=4, n_classes=5)
    got = peak_bytes(_config(), shape, population=2)
    assert got["data"] == 4 * 2 * 10 * 4            # float32, splits + one copy
    assert got["codes"] == 4 * 10 * 3               # widest hidden layer
    # fine-tuning (Adam: 2 slots): 4 * 38 * (2 + 2) = 608; pretraining layer 1 (momentum:
    # 1 slot): 4 * 19 * 3 = 228; twice (population 2)
    assert got["training"] == 2 * 608
    assert got["activations"] == 2 * 4 * 3 * 5 * (4 + 3 + 2)  # largest batch 5
    assert got["evaluation"] == 4 * 2 * 7 * 4
    assert got["device"] == 320 + 120 + 1216 + 1080 + 224
    assert got["total"] == got["device"] + BASE_BYTES


def test_the_largest_width_that_fits_is_the_boundary():
    config = _config(model={"hidden_sizes": [1000, 500]})
    shape = Shape(n_rows=100, n_features=50, n_classes=10)
    budget = peak_bytes(config, shape, 2, [300, 300])["device"]
    width = largest_width_that_fits(config, shape, 2, budget, "device")
    assert width == 300  # the estimate grows with the width: 300 fits, 301 does not
    problem = memory_problem(config, shape, 2, budget, "the GPU's free memory", key="device")
    assert "--set model.hidden_sizes=[300,300]" in problem
    assert memory_problem(config, shape, 2, budget * 100, "x", key="device") is None


NAMES = ["layerwise", "a.b-c_d", "", " ", "../../evil", "a/b", "a:b", "..", "x" * 10]


@pytest.mark.parametrize("name", NAMES)
def test_model_names_follow_mlflows_rules(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    ours_ok = not name_problems("e", name)
    assert ours_ok == mlflow_ok


@pytest.mark.parametrize("name", ["layerwise", "", "x" * 500, "x" * 501])
def test_experiment_names_follow_mlflows_rules(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name

    try:
        _validate_experiment_name(name)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    assert (not name_problems(name, None)) == mlflow_ok

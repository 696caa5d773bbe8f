"""The served classifier applies the run's normalisation to raw pixels exactly as the data
stage does, and returns probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.served import RawPixelClassifier
from tasks.data import normalize


@pytest.fixture
def pixels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(300, 16), dtype=np.uint8)  # (N, D) raw pixels
    x[:, 0] = 0  # a constant border pixel, as MNIST has many
    return x


@pytest.mark.parametrize("method", ["unit", "standardize"])
def test_normalize_matches_the_data_stage_bit_for_bit(pixels, method):
    train, valid, test = pixels[:200], pixels[200:250], pixels[250:]
    (_, _, expected), stats = normalize(train, valid, test, method, zca_epsilon=0.1)
    stats32 = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in stats.items()}
    if method == "standardize":  # the bundle keeps float32 stats; 1/std from them must agree
        stats32["std"] = torch.as_tensor(stats["std"])
    served = RawPixelClassifier(nn.Identity(), method, stats32)
    got = served.normalize(torch.from_numpy(test.astype(np.float32))).numpy()
    assert np.array_equal(got, expected)


def test_zca_and_probabilities(pixels):
    train, valid, test = pixels[:200], pixels[200:250], pixels[250:]
    (_, _, expected), stats = normalize(train, valid, test, "zca", zca_epsilon=0.1)
    stats32 = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in stats.items()}
    served = RawPixelClassifier(nn.Identity(), "zca", stats32)
    x = torch.from_numpy(test.astype(np.float32))
    assert np.allclose(served.normalize(x).numpy(), expected, atol=1e-5)
    probs = served(x)  # identity "classifier": softmax over the 16 whitened pixels
    assert torch.allclose(probs, torch.softmax(torch.from_numpy(expected), dim=1), atol=1e-6)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(x)))


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="unknown normalization 'pca'"):
        RawPixelClassifier(nn.Identity(), "pca", {})


def _unit_classifier(pixel_range=(0.0, 255.0)):
    stats = {"low": torch.tensor(0.0), "high": torch.tensor(255.0)}
    return RawPixelClassifier(nn.Linear(16, 3), "unit", stats, pixel_range=pixel_range).eval()


@pytest.mark.parametrize("scale, refused", [
    (1 / 255, True),  # scaled to [0, 1]: every image would get the same few labels
    (1.0, False),  # raw pixels
    (-1.0, True),  # negative: standardised or otherwise not pixels
    (2.0, True),  # above 255
])
def test_a_request_that_is_not_raw_pixels_is_refused_saying_what_is_expected(pixels, scale,
                                                                            refused):
    from models.served import NOT_PIXELS

    x = torch.from_numpy(pixels.astype(np.float32)) * scale
    model = _unit_classifier()
    if refused:
        with pytest.raises(RuntimeError, match="expects raw pixels"):
            model(x)
        assert "0-255" in NOT_PIXELS and "[0, 1]" in NOT_PIXELS
    else:
        assert model(x).shape == (len(x), 3)
    assert _unit_classifier(pixel_range=None)(x).shape == (len(x), 3)  # no range: no check


def test_blank_images_are_pixels():
    model = _unit_classifier()
    assert model(torch.zeros(4, 16)).shape == (4, 3)


def test_the_check_survives_export_as_the_registered_model_is_saved(pixels):
    """The registered model is a ``torch.export`` program (MLflow's pt2 format): the check
    must be part of the graph, not a Python ``if`` that export would bake in."""
    x, model = torch.from_numpy(pixels.astype(np.float32)), _unit_classifier()
    program = torch.export.export(model, (x[:5],),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    assert torch.allclose(program(x[:7]), model(x[:7]))
    with pytest.raises(RuntimeError, match="expects raw pixels"):
        program(x[:7] / 255)

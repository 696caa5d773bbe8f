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

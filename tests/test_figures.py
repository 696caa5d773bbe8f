"""Tests for reports/figures.py: hand-computed rasters and counts, decodable files, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reports.figures import (
    _atomic_write,
    confusion_matrix,
    per_class_error,
    save_confusion_matrix,
    save_filters,
    save_image_rows,
    save_learning_curves,
    squarest_shape,
    tile_raster_images,
)


def _decoded_size(path) -> tuple[int, int]:
    """Fully verify a PNG with PIL and return its (width, height)."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        return im.size


# --- tile_raster_images -------------------------------------------------------------------


def test_tile_raster_images_hand_computed():
    # 3 images of 2x2 in a 2x2 grid with 1-pixel spacing -> (2+1)*2-1 = 5 per side.
    X = np.array(
        [
            [0.0, 1.0, 2.0, 3.0],  # -> (x-0)/(3+1e-8): 0, 1/3, 2/3, ~1
            [10.0, 20.0, 30.0, 20.0],  # -> (x-10)/(20+1e-8): 0, .5, ~1, .5
            [-1.0, 1.0, 0.0, 3.0],  # -> (x+1)/(4+1e-8): 0, .5, .25, ~1
        ]
    )
    out = tile_raster_images(X, img_shape=(2, 2), tile_shape=(2, 2), tile_spacing=(1, 1))
    # *255 is truncated as in the original: 1/3*255 = 84.99.. -> 84, ~1*255 -> 254.
    expected = np.array(
        [
            [0, 84, 0, 0, 127],
            [169, 254, 0, 254, 127],
            [0, 0, 0, 0, 0],  # spacing row
            [0, 127, 0, 0, 0],  # tile 3 (bottom right) is unused -> 0
            [63, 254, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_tile_raster_images_scales_each_tile_independently_and_unscaled_passthrough():
    # Same image at two scales: per-tile scaling makes the tiles identical.
    x = np.array([0.0, 0.25, 0.5, 1.0])
    out = tile_raster_images(np.stack([x, 100 * x + 7]), (2, 2), (1, 2), tile_spacing=(0, 0))
    np.testing.assert_array_equal(out[:, :2], out[:, 2:])
    raw = tile_raster_images(np.array([[0.0, 0.5, 1.0, 2.0]]), (2, 2), (1, 1), (0, 0), False)
    np.testing.assert_array_equal(raw, [[0, 127], [255, 255]])  # 2.0 is clipped, not wrapped
    empty = tile_raster_images(np.zeros((0, 4)), (2, 2), (2, 3), (1, 2))
    assert empty.shape == (5, 10) and not empty.any()  # ((2+1)*2-1, (2+2)*3-2), all unused


# --- save_filters -------------------------------------------------------------------------


def test_save_filters_is_large_titled_and_scaled(tmp_path):
    """The tutorial's 10x10 layout, but readable: tiles at least twice the tutorial's
    289x289 raster, a title, and a colour bar (a shared scale, so tiles compare)."""
    W = np.random.default_rng(0).uniform(-1, 1, size=(500, 784)).astype(np.float32)
    path = save_filters(W, tmp_path / "filters.png", title="Layer 1 filters")
    assert path == tmp_path / "filters.png"
    w, h = _decoded_size(path)
    with Image.open(path) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    # the tile grid: the largest block of rows/columns that are not plain white margin
    inked_cols = np.flatnonzero((gray < 250).sum(axis=0) > 0.5 * h)
    grid_width = inked_cols.max() - inked_cols.min() + 1  # tiles (and the colour bar)
    assert w >= 2 * 289 and h >= 2 * 289, (w, h)
    assert grid_width >= 2 * 289
    # the top rows hold the title: dark text pixels above the grid
    top = np.flatnonzero((gray < 128).any(axis=1))[0]
    assert top < 0.06 * h


def test_save_filters_rejects_wrong_n_visible(tmp_path):
    with pytest.raises(ValueError, match=r"500.*784|784.*500"):
        save_filters(np.zeros((10, 500)), tmp_path / "f.png", img_shape=(28, 28))
    assert not (tmp_path / "f.png").exists()


# --- squarest_shape -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "D, shape", [(1000, (25, 40)), (784, (28, 28)), (13, (1, 13)), (1, (1, 1)), (500, (20, 25))]
)
def test_squarest_shape(D, shape):
    assert squarest_shape(D) == shape


# --- matplotlib figures -------------------------------------------------------------------


def test_save_image_rows_with_images_and_codes(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.uniform(size=(8, 784))
    rows = [("original", X), ("corrupted", X * (rng.uniform(size=X.shape) > 0.3)),
            ("codes", rng.uniform(size=(8, 1000))), ("reconstruction", X[:5])]
    path = save_image_rows(rows, tmp_path / "sub" / "recon.png", img_shape=(28, 28))
    w, h = _decoded_size(path)
    assert (w, h) == (950, 400)  # figsize (8 + 1.5, 4 rows) inches at 100 dpi
    captioned = save_image_rows(rows, tmp_path / "captioned.png", caption="what they show")
    assert _decoded_size(captioned) == (950, 450)  # half an inch for the caption


def test_save_learning_curves(tmp_path):
    histories = {
        "pretrained": [{"epoch": e, "train_loss": 1 / (e + 1), "val_error": 0.05 - 0.003 * e}
                       for e in range(10)],
        "random": [{"epoch": e, "train_loss": 2 / (e + 1), "val_error": 0.08 - 0.002 * e}
                   for e in range(12)] + [{"epoch": 12, "train_loss": 0.1}],  # no val this epoch
    }
    path = save_learning_curves(histories, tmp_path / "curves.png")
    assert _decoded_size(path) == (1000, 380)  # two 5 x 3.8 inch subplots at 100 dpi


def test_save_confusion_matrix_csv_round_trips(tmp_path):
    cm = np.array([[50, 2, 0], [3, 40, 7], [0, 0, 0]], dtype=np.int64)
    png, csv = save_confusion_matrix(
        cm, tmp_path / "cm.png", tmp_path / "cm.csv", class_names=["a", "b", "c"], title="test"
    )
    w, h = _decoded_size(png)
    assert w >= 300 and h >= 300
    df = pd.read_csv(csv, index_col=0)
    assert df.index.name == "true"
    assert list(df.columns) == ["a", "b", "c"] and list(df.index) == ["a", "b", "c"]
    np.testing.assert_array_equal(df.to_numpy(), cm)
    assert df.to_numpy().dtype.kind == "i"


def test_save_confusion_matrix_default_names_round_trip(tmp_path):
    cm = confusion_matrix(np.arange(10).repeat(3), np.arange(30) % 10, 10)
    _, csv = save_confusion_matrix(cm, tmp_path / "cm.png", tmp_path / "cm.csv")
    np.testing.assert_array_equal(pd.read_csv(csv, index_col=0).to_numpy(), cm)
    with pytest.raises(ValueError, match="class_names"):
        save_confusion_matrix(cm, tmp_path / "x.png", tmp_path / "x.csv", class_names=["a"])


# --- confusion_matrix / per_class_error ---------------------------------------------------


def test_confusion_matrix_hand_computed():
    y_true = np.array([0, 0, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 2, 0])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    np.testing.assert_allclose(per_class_error(cm), [1 / 2, 1 / 3, 1 / 2])


def test_confusion_matrix_accepts_torch_and_rejects_bad_labels():
    torch = pytest.importorskip("torch")
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([1, 1, 1]), 2)
    np.testing.assert_array_equal(cm, [[0, 1], [0, 2]])
    with pytest.raises(ValueError, match="y_pred"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)


def test_per_class_error_class_without_examples_is_zero():
    cm = confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), 4)  # classes 2, 3 empty
    err = per_class_error(cm)
    assert not np.isnan(err).any()
    np.testing.assert_allclose(err, [2 / 3, 0.0, 0.0, 0.0])


# --- atomic writes ------------------------------------------------------------------------


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.png"

    def half_write(tmp):
        tmp.write_bytes(b"\x89PNG half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _atomic_write(target, half_write)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "cm.csv"
    target.write_text("old\n")

    def fail(tmp):
        tmp.write_text("new, partial")
        raise KeyboardInterrupt  # a Ctrl-C mid-write must not leave a temp file either

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(target, fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.csv"]
    assert _atomic_write(target, lambda tmp: tmp.write_text("new\n")) == target
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["cm.csv"]


def test_figure_writer_failure_leaves_no_file(tmp_path, monkeypatch):
    # Simulate savefig dying midway through a real figure writer.
    import matplotlib.figure

    def broken_savefig(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG partial")
        raise OSError("killed")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="killed"):
        save_learning_curves({"random": [{"epoch": 0, "train_loss": 1.0, "val_error": 0.1}]},
                             tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []


def test_a_deeper_layers_corrupted_input_is_shown_as_pixels_with_a_caption(tmp_path,
                                                                          monkeypatch):
    """Layer 2's input is a code: shown decoded through layer 1 (image-shaped rows, no
    "(codes)" grid of activations), with a caption; filters carry a title."""
    from types import SimpleNamespace

    import torch

    from models.dae import DenoisingAutoencoder
    from tasks import pretrain_figures

    torch.manual_seed(0)
    lower = DenoisingAutoencoder(784, 36, corruption_level=0.1)
    dae = DenoisingAutoencoder(36, 16, corruption_level=0.2)
    data = SimpleNamespace(image_shape=(28, 28), n_features=784,
                           x_valid=torch.rand(12, 784))
    codes = torch.sigmoid(torch.randn(12, 36))
    seen = {}

    def spy(rows, path, img_shape=(28, 28), caption=None):
        seen[Path(path).name] = ([X.shape for _, X in rows], caption)
        return Path(path)

    from reports import figures

    monkeypatch.setattr(figures, "save_image_rows", spy)
    paths = pretrain_figures.layer_figures(1, dae, [lower.state_dict()], codes, data, tmp_path,
                                   seed=0, epochs=3)
    shapes, caption = seen["corrupted_layer_2.png"]
    assert shapes == [(10, 784), (10, 784)]  # decoded to pixels, not 36-unit codes
    assert "layer 1's code" in caption and "masking noise 0.2" in caption
    assert _decoded_size(paths["filters"])[0] >= 2 * 289

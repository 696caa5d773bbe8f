"""The reconstruct objective's figures: test reconstructions side by side, the 2-D code map
coloured by class, and the learning curves of both arms (Hinton & Salakhutdinov 2006,
Figs. 2 and 3, drawn for our runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from reports.figures import _pyplot, _save_figure, save_image_rows, save_learning_curves

#: Rows of the reconstruction figure, top to bottom, after the originals.
ROW_LABELS = {"pca": "PCA", "random": "random init", "pretrained": "pretrained"}


def save_reconstructions(originals: torch.Tensor, recons: Mapping[str, torch.Tensor],
                         path: str | os.PathLike, img_shape: Sequence[int]) -> Path:
    """One row of test images, then one row per method's reconstructions of them.

    Args:
        originals: (n, D) test images in [0,1].
        recons: method -> (n, D) reconstructions (PCA's may leave [0,1]: clipped to show).
        path: Target ``.png``.
        img_shape: (H, W).
    """
    rows = [("original", originals.numpy())]
    rows += [(ROW_LABELS.get(m, m), z.clamp(0, 1).float().numpy()) for m, z in recons.items()]
    return save_image_rows(rows, path, tuple(img_shape))


def save_code_map(codes: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  path: str | os.PathLike) -> Path:
    """Scatter of 2-D codes, one panel per method, points coloured by class.

    Args:
        codes: panel title -> (N, 2) codes of the test images.
        labels: (N,) classes.
        path: Target ``.png``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(codes), figsize=(5 * len(codes), 4.6), squeeze=False)
    try:
        for ax, (title, c) in zip(axes[0], codes.items()):
            c = c.float().numpy()
            points = ax.scatter(c[:, 0], c[:, 1], c=labels.numpy(), cmap="tab10", s=2,
                                vmin=-0.5, vmax=9.5)
            ax.set_title(title)
            ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(points, ax=axes[0].tolist(), ticks=range(10), label="class")
        fig.set_layout_engine("constrained")
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def save_autoencoder_curves(histories: Mapping[str, list[dict]],
                            path: str | os.PathLike) -> Path:
    """Per-epoch training and validation squared error per image of both arms."""
    return save_learning_curves(histories, path, metrics=("train_sq_error_per_image",
                                                          "val_sq_error_per_image"))

"""Images arranged as arrays: the tutorial's tiled raster of filters, the squarest shape of
a code vector, and a row of images side by side. Plain numpy; ``reports.figures`` draws them.
"""

from __future__ import annotations

import math

import numpy as np


def _to_numpy(x) -> np.ndarray:
    """A numpy view of ``x``; a torch tensor is detached and moved to the CPU."""
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def tile_raster_images(
    X: np.ndarray,
    img_shape: tuple[int, int],
    tile_shape: tuple[int, int],
    tile_spacing: tuple[int, int] = (1, 1),
    scale_rows_to_unit_interval: bool = True,
) -> np.ndarray:
    """Tile the rows of ``X`` as images into one grayscale raster.

    A port of DeepLearningTutorials' ``utils.tile_raster_images`` (2-D case). Tile t sits at
    row t // tw, column t % tw, scaled as ``x' = (x - min x) / (max(x - min x) + 1e-8)``. As in
    the original, ``x' * 255`` is truncated to uint8, so a scaled tile's brightest pixel is
    254; unlike it, unscaled values are clipped to [0, 1] rather than wrapping around.

    Args:
        X: (n, H*W) array, one image per row.
        img_shape: (H, W) of each image.
        tile_shape: (th, tw) tiles; rows beyond th*tw are dropped, tiles beyond n stay 0.
        tile_spacing: (sh, sw) pixels of 0 between tiles.
        scale_rows_to_unit_interval: Min-max scale each tile to [0, 1] independently.

    Returns:
        uint8 array of shape ((H+sh)*th - sh, (W+sw)*tw - sw).
    """
    X = _to_numpy(X).astype(np.float64)  # float64 so the 1e-8 eps is not lost to rounding
    (H, W), (th, tw), (sh, sw) = img_shape, tile_shape, tile_spacing
    if X.ndim != 2 or X.shape[1] != H * W:
        raise ValueError(f"X must have shape (n, {H * W}) for img_shape {img_shape}, got {X.shape}")
    out = np.zeros(((H + sh) * th - sh, (W + sw) * tw - sw), dtype=np.uint8)
    for t in range(min(X.shape[0], th * tw)):
        img = X[t].reshape(H, W)
        if scale_rows_to_unit_interval:  # the original's scale_to_unit_interval, eps 1e-8
            img = img - img.min()
            img = img * (1.0 / (img.max() + 1e-8))
        r, c = divmod(t, tw)
        y0, x0 = r * (H + sh), c * (W + sw)  # clip: unscaled values outside [0, 1] would wrap
        out[y0 : y0 + H, x0 : x0 + W] = np.clip(img, 0.0, 1.0) * 255
    return out


def squarest_shape(D: int) -> tuple[int, int]:
    """The factor pair (h, w), h <= w, h*w == D, closest to square; (1, D) for a prime D."""
    if D < 1:
        raise ValueError(f"D must be a positive integer, got {D}")
    h = next(d for d in range(math.isqrt(D), 0, -1) if D % d == 0)
    return h, D // h


def row_strip(X: np.ndarray, shape: tuple[int, int], n_cols: int, gap: int = 2) -> np.ndarray:
    """The n images of X (n, H·W) side by side in ``n_cols`` cells, each scaled to [0, 1]
    by its own minimum and maximum (as ``imshow`` scales a lone image); gaps and the cells of
    a short row are NaN (drawn blank): (H, n_cols·(W + gap) − gap)."""
    H, W = shape
    strip = np.full((H, n_cols * (W + gap) - gap), np.nan)
    for j, x in enumerate(X[:n_cols]):
        lo, hi = float(x.min()), float(x.max())
        img = (x.reshape(H, W) - lo) / (hi - lo) if hi > lo else np.zeros((H, W))
        strip[:, j * (W + gap): j * (W + gap) + W] = img
    return strip

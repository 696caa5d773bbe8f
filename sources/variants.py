"""MNIST variants of Larochelle et al. (2007), regenerated deterministically from MNIST.

These are NOT the published ``mnist_background_random`` / ``mnist_rotation_new`` files
(those use 10k/2k/50k splits and their own random draws): they apply the same recipe to
MNIST's own 60k/10k splits, seeded by ``data.variant_seed``, so anyone with MNIST gets the
same arrays (the seed is part of the data digest).
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.keys import derive_seed

#: Names accepted by ``--dataset``.
VARIANTS = ("mnist-bg-rand", "mnist-rot")


def background_random(x: np.ndarray, seed: int) -> np.ndarray:
    """bg-rand: each pixel becomes max(digit, u), u ~ U[0, 1] i.i.d. per pixel.

    Args:
        x: uint8 (N, 784) digits.
        seed: generator seed.

    Returns:
        uint8 (N, 784). The noise is drawn as integers 0..255, i.e. U[0, 1] quantised to
        the 256 levels the pixels have, so ``unit`` scaling stays exact.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    noise = rng.integers(0, 256, size=x.shape, dtype=np.uint8)  # (N, 784)
    return np.maximum(x, noise)


def rotate(x: np.ndarray, seed: int, chunk: int = 10_000) -> np.ndarray:
    """rot: each image rotated about its centre by θ ~ U[0, 2π), bilinear, zeros outside.

    Args:
        x: uint8 (N, 784) digits (28×28).
        seed: generator seed (one angle per image, drawn in row order).
        chunk: images per ``grid_sample`` call (bounds memory).

    Returns:
        uint8 (N, 784), rounded to the nearest level.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    theta = rng.uniform(0.0, 2 * np.pi, size=len(x))  # (N,)
    out = np.empty_like(x)
    for s in range(0, len(x), chunk):
        t = torch.from_numpy(theta[s:s + chunk]).float()  # (B,)
        cos, sin = torch.cos(t), torch.sin(t)
        zero = torch.zeros_like(t)
        # (B, 2, 3): output coordinate -> input coordinate, a rotation by θ about the centre
        affine = torch.stack([torch.stack([cos, -sin, zero], 1),
                              torch.stack([sin, cos, zero], 1)], 1)  # fmt: skip
        img = torch.from_numpy(x[s:s + chunk]).float().reshape(-1, 1, 28, 28)  # (B, 1, 28, 28)
        grid = torch.nn.functional.affine_grid(affine, list(img.shape), align_corners=False)
        rot = torch.nn.functional.grid_sample(img, grid, mode="bilinear",
                                              padding_mode="zeros", align_corners=False)
        out[s:s + chunk] = rot.reshape(len(img), -1).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def make_variant(
    name: str, x_pool: np.ndarray, x_test: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Apply variant ``name`` to MNIST's training pool and test set (independent streams).

    Returns:
        x_pool uint8 (60000, 784), x_test uint8 (10000, 784); labels are MNIST's.
    """
    fn = {"mnist-bg-rand": background_random, "mnist-rot": rotate}[name]
    return (fn(x_pool, derive_seed(seed, name, "train")),
            fn(x_test, derive_seed(seed, name, "test")))  # fmt: skip

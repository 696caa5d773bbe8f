"""The registered models as a user calls them: raw pixels in; class probabilities out
(the classifier), the reconstruction in the input's own scale (the autoencoder) or the code
(the encoder).

The pipeline trains on normalised inputs (``unit``: x / 255; ``standardize``: per-pixel
z-scores; ``zca``: whitened). A registered model that expected those would need the
training run's statistics at prediction time, so this module carries them as buffers and
applies the run's normalisation itself, with the same float32 arithmetic as
``tasks.data.normalize`` (so that it reproduces the logged test error exactly). For
``standardize`` that holds bit for bit when ``std`` is given in float64, as the data stage
computes it: 1 / std rounded from a float32 std differs in the last bit for about a quarter
of the pixels.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

INPUT_DESCRIPTION = (
    "float32 (N, {n}) raw pixels as the dataset stores them: for MNIST the 28x28 image "
    "flattened row-major to 784 values in 0-255 (not scaled to [0,1])"
)
OUTPUT_DESCRIPTION = "float32 (N, {k}) class probabilities (rows sum to 1); argmax is the label"
AE_OUTPUT_DESCRIPTION = ("float32 (N, {n}) reconstructed pixels in the input's own scale "
                         "(MNIST: 0-255)")
CODE_DESCRIPTION = "float32 (N, {c}) codes (the autoencoder's code layer)"


class RawPixels(nn.Module):
    """The run's normalisation as a module: raw (N, D) pixels -> the network's inputs.

    Args:
        normalization: ``unit``, ``standardize`` or ``zca``, as the run's data stage used.
        stats: That stage's statistics (``tasks.data.DataBundle.norm_stats``): ``low``,
            ``high`` for ``unit``/``zca``; ``mean``, ``std`` (D,) for ``standardize``;
            plus ``mean`` (D,) and ``zca_matrix`` (D, D) for ``zca``.
    """

    def __init__(self, normalization: str, stats: Mapping[str, torch.Tensor]):
        super().__init__()
        if normalization not in ("unit", "standardize", "zca"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.normalization = normalization
        f32 = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats.items()}
        if normalization == "standardize":
            # tasks.data.normalize: (x - mean) * (1 / std), both rounded to float32; its
            # guard too: a feature constant in training (std 0) is divided by 1, not by 0
            self.register_buffer("mean", f32["mean"])  # (D,)
            std = torch.as_tensor(stats["std"], dtype=torch.float64)
            inv = 1.0 / torch.where(std == 0, torch.ones_like(std), std)
            self.register_buffer("inv_std", inv.to(torch.float32))  # (D,)
        else:
            # tasks.data.normalize's guard: a constant training split is scaled by 1, not 0
            span = (f32["high"] - f32["low"]).reshape(())
            self.register_buffer("low", f32["low"].reshape(()))
            self.register_buffer("span", torch.where(span == 0, torch.ones_like(span), span))
        if normalization == "zca":
            self.register_buffer("mean", f32["mean"])  # (D,)
            self.register_buffer("zca_matrix", f32["zca_matrix"])  # (D, D)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (N, D) pixels -> the normalised (N, D) inputs the classifier was trained on."""
        if self.normalization == "standardize":
            return (x - self.mean) * self.inv_std
        x = ((x - self.low) / self.span).clamp(0.0, 1.0)  # uint8 data: x / 255 exactly
        if self.normalization == "zca":
            x = (x - self.mean) @ self.zca_matrix  # (N, D) @ (D, D) -> (N, D)
        return x


#: What a request that is clearly not raw 8-bit pixels is told (a constant: the check runs
#: inside the exported program, ``torch._assert_async``, whose message is fixed at export).
NOT_PIXELS = (
    "layerwise: this model expects raw pixels, float32 (N, D) in 0-255 as the dataset stores "
    "them (MNIST: each 28x28 image flattened row-major to 784 values, ink 255), not scaled "
    "to [0, 1] or standardised; this request's values were all <= 1 (but not all 0), or "
    "outside 0-255. Send the pixel values unchanged: the model applies the run's "
    "normalisation itself."
)


class RawPixelClassifier(RawPixels):
    """normalise(x) -> classifier -> softmax.

    Args:
        classifier: The fine-tuned network mapping normalised (N, D) inputs to logits (N, K).
        normalization, stats: As ``RawPixels``.
        pixel_range: ``(low, high)`` of the raw inputs when they are 8-bit pixels (MNIST:
            ``(0, 255)``): a request with any value outside it, or whose values are all in
            (0, 1] (images scaled to [0, 1], which would otherwise all be classified alike),
            is refused with ``NOT_PIXELS`` (``RuntimeError``). None: no check.
    """

    def __init__(self, classifier: nn.Module, normalization: str,
                 stats: Mapping[str, torch.Tensor],
                 pixel_range: Optional[tuple[float, float]] = None):
        super().__init__(normalization, stats)
        self.classifier, self.pixel_range = classifier, pixel_range

    def check_pixels(self, x: torch.Tensor) -> None:
        """Refuse a whole request (N, D) that is clearly not raw pixels in ``pixel_range``."""
        if self.pixel_range is None:
            return
        low, high = self.pixel_range
        top = x.amax()  # () over the whole request: one image at 0-255 makes it pixels
        ok = (x.amin() >= low) & (top <= high) & ((top > low + 1) | (top == low))
        torch._assert_async(ok, NOT_PIXELS)  # exported with the program (pt2), unlike `if`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (N, D) -> class probabilities (N, K)."""
        self.check_pixels(x)
        return torch.softmax(self.classifier(self.normalize(x)), dim=1)


class RawPixelAutoencoder(RawPixels):
    """normalise(x) -> encode -> decode -> the input's scale: z · (high − low) + low; or,
    with ``code=True``, normalise(x) -> encode (the code). ``unit`` normalisation only, the
    reconstruct objective's (its outputs are pixels in [0,1]).

    Args:
        autoencoder: A fine-tuned ``models.autoencoder.AutoencoderPopulation`` of one member.
        stats: The data stage's ``low`` and ``high``.
        code: Return the code instead of the reconstruction (the registered encoder).
    """

    def __init__(self, autoencoder: nn.Module, stats: Mapping[str, torch.Tensor],
                 code: bool = False):
        super().__init__("unit", stats)
        self.autoencoder, self.code = autoencoder, code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (N, D) -> reconstruction (N, D) in their scale, or code (N, c)."""
        h = self.autoencoder.encode(self.normalize(x).unsqueeze(0))  # (1, N, c): one member
        if self.code:
            return h[0]
        return self.autoencoder.decode(h)[0] * self.span + self.low  # (N, D)

"""What a pretrained layer looks like: its filters, its corrupted input and its
reconstructions, as PNG figures drawn by ``reports.figures``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.keys import Seed, derive_seed

N_EXAMPLES = 10  # images per row in the corrupted-input and reconstruction figures


@torch.no_grad()
def layer_figures(
    k: int,
    dae: Any,
    lower_states: Sequence[dict[str, torch.Tensor]],
    codes_valid: torch.Tensor,
    data: Any,
    out_dir: Path,
    seed: int,
    epochs: int = 0,
) -> dict[str, Path]:
    """Filters, corrupted-input examples and original-vs-reconstruction grids of layer k.

    Deeper filters are shown through their linear projection to input space, W_k…W_1; the
    reconstruction of layer k goes back down the whole stack (decode_k, then decode_{k-1}, …)
    so that it is always shown as images; so is layer k's corrupted input (for k ≥ 2 a code,
    whose grid of activations says nothing to a viewer), with a caption saying so.
    """
    from reports import figures

    img_shape = data.image_shape or figures.squarest_shape(data.n_features)
    projection = dae.encoder.W
    for state in reversed(lower_states):
        projection = projection @ state["encoder.linear.weight"]  # (n_k, n_{k-1}) @ (n_{k-1}, …)
    noise = f"{dae.noise} noise {dae.corruption_level:g}"
    via = "" if k == 0 else f" (through W_{k + 1}…W_1)"
    paths = {
        "filters": figures.save_filters(
            projection.numpy(), out_dir / f"filters_layer_{k + 1}.png", img_shape,
            title=f"Layer {k + 1} filters{via}: {dae.n_hidden} units, after {epochs} "
                  f"epoch{'s' * (epochs != 1)} of pretraining with {noise}")
    }
    g = torch.Generator().manual_seed(derive_seed(seed, Seed.FIGURE_NOISE, k))
    clean = codes_valid[:N_EXAMPLES]
    corrupted = dae.corrupt(clean, g)
    down = functools.partial(decode_down, states=lower_states, loss=dae.loss)
    caption = (f"Layer 1's input: validation images, clean and with {noise}, which the "
               "layer learns to undo." if k == 0 else
               f"Layer {k + 1}'s input is layer {k}'s code ({dae.n_visible} units): clean and "
               f"with {noise}, each decoded to pixels through "
               f"{'layer 1' if k == 1 else f'layers {k}…1'} to be seen.")
    paths["corrupted"] = figures.save_image_rows(
        [("clean", down(clean).numpy()), (f"corrupted ({noise})", down(corrupted).numpy())],
        out_dir / f"corrupted_layer_{k + 1}.png", img_shape, caption=caption,
    )
    z = down(dae.decode(dae.encode(corrupted)))  # back down the stack to input space
    paths["reconstruction"] = figures.save_image_rows(
        [("original", data.x_valid[:N_EXAMPLES].numpy()), ("reconstruction", z.numpy())],
        out_dir / f"reconstruction_layer_{k + 1}.png", img_shape,
    )
    return paths


def decode_down(h: torch.Tensor, states: Sequence[dict[str, torch.Tensor]], loss: str
                ) -> torch.Tensor:
    """A code of layer len(states) (n, n_k) decoded down the stack to the inputs (n, D)."""
    for state in reversed(states):
        h = decode_with_state(h, state, loss)
    return h


def decode_with_state(h: torch.Tensor, state: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """z = s(W' h + b') for a stored dA state (W' = Wᵀ when tied); s is the sigmoid for a
    cross-entropy dA and the identity for a squared-error one, as in ``DenoisingAutoencoder``."""
    w_prime = state.get("W_prime", state["encoder.linear.weight"].t())  # (n_visible, n_hidden)
    a = h @ w_prime.t() + state["b_prime"]
    return torch.sigmoid(a) if loss == "cross_entropy" else a

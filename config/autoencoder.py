"""The reconstruct objective's section of the config (``PipelineConfig.autoencoder``) and
the rules it adds: the unrolled deep autoencoder of Hinton & Salakhutdinov (2006)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: What fine-tuning optimises: class labels, or the input itself.
Objective = Literal["classify", "reconstruct"]


class AutoencoderConfig(BaseModel):
    """The unrolled deep autoencoder of ``objective='reconstruct'``: the pretrained encoders,
    then their decoders in reverse order, fine-tuned end to end on reconstruction under the
    ``finetune`` section's budget, optimiser and stopping rule (on the validation squared
    error per image)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    code_activation: Literal["linear", "hidden"] = Field(
        "linear",
        description="Units of the code (top) layer: 'linear' as in Hinton & Salakhutdinov "
        "2006 (the top layer is then also pretrained linear), or 'hidden' (model.activation).",
    )
    tied_decoder: bool = Field(
        False,
        description="Fine-tune with decoder weights shared with the encoder (W'_l = W_l^T); "
        "else the decoder starts as a copy of the pretrained decoders and trains its own.",
    )
    loss: Literal["cross_entropy", "squared_error"] = Field(
        "cross_entropy",
        description="Fine-tuning loss (sigmoid output for cross_entropy, linear for "
        "squared_error); the reported error is always the squared error per image.",
    )
    code_lr_scale: float = Field(
        0.01, gt=0, le=1, allow_inf_nan=False,
        description="Pretraining learning rate of a linear code layer as a fraction of "
        "pretrain.optimizer.lr. Linear units are unbounded: the rate that trains a sigmoid "
        "layer makes them diverge. Hinton & Salakhutdinov's code trains its linear top RBM "
        "at 0.001 against 0.1 for the others (rbmhidlinear.m), the default's ratio.",
    )
    knn_k: int = Field(
        5, ge=1, description="Neighbours of the k-NN accuracy of each code on the test "
        "labels (the training codes are the reference set).",
    )


def layer_activation(config: Any, k: int) -> str:
    """Hidden units of layer ``k`` (0-based) of a ``PipelineConfig``: ``model.activation``,
    except the code layer of a reconstruct run with a linear code (``"linear"``)."""
    if (config.objective == "reconstruct" and config.autoencoder.code_activation == "linear"
            and k == config.model.n_layers - 1):
        return "linear"
    return config.model.activation


def layer_optimizer(config: Any, k: int) -> dict[str, Any]:
    """The pretraining optimiser of layer ``k`` (0-based) of a ``PipelineConfig``:
    ``pretrain.optimizer``, with its learning rate scaled by ``autoencoder.code_lr_scale``
    for a linear code layer (``layer_activation(config, k) == "linear"``)."""
    optimizer = config.pretrain.optimizer.model_dump(mode="json")
    if layer_activation(config, k) == "linear":
        optimizer["lr"] *= config.autoencoder.code_lr_scale
    return optimizer


def check_reconstruct(config: Any) -> None:
    """What the reconstruct objective needs: pixels in [0,1] (its error is measured there)
    and no dropout (the autoencoder has none).

    Raises:
        ValueError: naming the field and the value that works.
    """
    if config.objective != "reconstruct":
        return
    if config.data.normalization != "unit":
        raise ValueError(
            "objective='reconstruct' measures squared error on pixels in [0,1], but "
            f"data.normalization={config.data.normalization!r}: use normalization='unit'")
    if config.model.dropout:
        raise ValueError(
            f"objective='reconstruct' has no dropout, but model.dropout={config.model.dropout}:"
            " set model.dropout=0")

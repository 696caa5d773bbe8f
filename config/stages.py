"""Typed, validated configuration: one pydantic model per stage, each owning its defaults.

A flow takes one :class:`PipelineConfig`. Every field is documented, validated before any
work starts, flattened into MLflow params, and used somewhere (docs/design.md §4).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config.autoencoder import AutoencoderConfig, Objective, check_reconstruct
from config.sizes import MNIST_TRAIN_POOL, MNIST_VALID_SIZE, plan_split, size_problems
from models.corruption import NOISE_NAMES, check_level

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu"]
InitScheme = Literal["tutorial", "xavier", "he"]
NoiseType = Literal[NOISE_NAMES]  # the keys of models.corruption.PROCESSES
ReconstructionLoss = Literal["cross_entropy", "squared_error"]
Normalization = Literal["unit", "standardize", "zca"]

#: ``--dataset`` names: the IDX family (torchvision) and MNIST variants generated from MNIST.
NAMED_DATASETS = ("mnist", "fashion-mnist", "kmnist", "mnist-bg-rand", "mnist-rot")
#: Suffixes of a user's own data file.
FILE_SUFFIXES = (".npz", ".csv", ".parquet")


def default_data_dir() -> Path:
    """The data root: ``$LAYERWISE_DATA_DIR`` when set, else ``./data``."""
    return Path(os.environ.get("LAYERWISE_DATA_DIR", "data"))


class StageConfig(BaseModel):
    """Base for every config: immutable, unknown keys and NaN/inf rejected, stable to hash."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form; stable across processes and machines."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


class DataConfig(StageConfig):
    """Where the data comes from, how it is split and how it is normalised."""

    dataset: str = Field(
        "mnist",
        description="mnist | fashion-mnist | kmnist | mnist-bg-rand | mnist-rot, or a file: "
        ".npz (x_train, y_train, x_test, y_test[, x_valid, y_valid]), .csv or .parquet.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="torchvision root holding MNIST/raw/*-ubyte and the other named datasets "
        "(env LAYERWISE_DATA_DIR).",
    )
    download: bool = Field(
        True, description="Download a named dataset into data_dir when its files are absent."
    )
    n_valid: Optional[int] = Field(
        None,
        ge=1,
        description="Validation examples: the last n_valid training rows (None: 10000 for a "
        "named dataset, else the file's own split or valid_fraction of its rows).",
    )
    valid_fraction: float = Field(
        0.1, gt=0, lt=1,
        description="File without a validation split, n_valid unset: stratified, seeded "
        "fraction of the training rows used for validation.",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="Table without a split column: stratified, seeded fraction of the rows "
        "held out as the test split.",
    )
    label_column: str = Field("label", min_length=1, description="Label column of a table.")
    n_train: Optional[int] = Field(
        None,
        ge=1,
        description="Seeded, class-stratified subset of the training split (None: all of it).",
    )
    subset_seed: int = Field(0, ge=0, description="Seed of the n_train subset and fraction splits.")
    variant_seed: int = Field(0, ge=0, description="Seed of mnist-bg-rand / mnist-rot.")
    normalization: Normalization = Field(
        "unit", description="'unit' ([0,1]), 'standardize' (per feature) or 'zca' whitening."
    )
    zca_epsilon: float = Field(
        0.01, gt=0, description="Regulariser added to the eigenvalues in ZCA whitening."
    )

    @property
    def is_named(self) -> bool:
        """A dataset known by name (60k/10k, 28×28), not a file."""
        return self.dataset in NAMED_DATASETS

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, v: str) -> str:
        if v.lower() in NAMED_DATASETS:
            return v.lower()
        if not v.lower().endswith(FILE_SUFFIXES):
            raise ValueError(f"dataset must be one of {', '.join(NAMED_DATASETS)} or a path "
                             f"ending in {', '.join(FILE_SUFFIXES)}, got {v!r}")
        return v


class ModelConfig(StageConfig):
    """Architecture of the stacked autoencoder and of the deep classifier built from it."""

    hidden_sizes: list[int] = Field(
        [1000, 1000, 1000], min_length=1, description="Units per hidden layer, bottom first."
    )
    activation: Activation = Field("sigmoid", description="Hidden-unit non-linearity.")
    tied_weights: bool = Field(True, description="Decoder uses W' = W^T (else its own W').")
    init: InitScheme = Field(
        "tutorial",
        description="Initial weights of the autoencoders and of the random-init classifier.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on hidden layers in fine-tuning.")

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        for i, n in enumerate(v):
            if n < 1:
                raise ValueError(f"hidden_sizes[{i}] = {n}: every layer needs at least 1 unit")
        return v

    @property
    def n_layers(self) -> int:
        return len(self.hidden_sizes)


class OptimizerConfig(StageConfig):
    """SGD (optionally with momentum) or Adam."""

    name: Literal["sgd", "adam"] = Field("sgd", description="Optimiser.")
    lr: float = Field(0.1, gt=0, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (SGD only).")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD only, needs momentum>0).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")

    @model_validator(mode="after")
    def _consistent(self) -> "OptimizerConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov=True needs name='sgd' and momentum > 0")
        if self.name == "adam" and self.momentum:
            raise ValueError("momentum applies to SGD only; for Adam set beta1 instead")
        return self


class PretrainConfig(StageConfig):
    """Greedy layer-wise denoising-autoencoder pretraining (Vincent et al. 2010)."""

    epochs: int = Field(15, ge=1, description="Epochs per layer.")
    batch_size: int = Field(1, ge=1, description="Minibatch size.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=0.001), description="Optimiser per layer."
    )
    noise: NoiseType = Field("masking", description="Corruption process q(x~|x).")
    corruption_levels: list[float] = Field(
        [0.1, 0.2, 0.3], min_length=1, description="Per layer: ν (masking, s&p) or σ (gaussian)."
    )
    loss: ReconstructionLoss = Field("cross_entropy", description="Reconstruction loss.")

    @field_validator("corruption_levels")
    @classmethod
    def _levels_in_range(cls, v: list[float]) -> list[float]:
        for i, level in enumerate(v):
            check_level(level, f"corruption_levels[{i}]")
        return v


class FinetuneConfig(StageConfig):
    """Supervised fine-tuning of the whole classifier, shared by both twins."""

    max_epochs: int = Field(1000, ge=1, description="Epoch budget.")
    batch_size: int = Field(1, ge=1, description="Minibatch size.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=0.1), description="Optimiser."
    )
    early_stopping: Literal["tutorial", "patience", "none"] = Field(
        "tutorial",
        description="'tutorial': patience in steps, grown on improvement; 'patience': epochs.",
    )
    patience_batches: int = Field(
        10, ge=1, description="tutorial rule: initial patience = this × batches per epoch."
    )
    patience_increase: float = Field(2.0, ge=1, description="tutorial rule: patience growth.")
    improvement_threshold: float = Field(
        0.995, gt=0, le=1, description="Relative improvement that counts as significant."
    )
    patience_epochs: int = Field(10, ge=1, description="'patience' rule: epochs without gain.")


class RuntimeConfig(StageConfig):
    """Seed and hardware."""

    seed: int = Field(0, ge=0, description="Seed of initialisation, noise and data order.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        "auto", description="Lightning accelerator."
    )
    precision: Literal["auto", "32-true", "bf16-mixed"] = Field(
        "auto", description="Training precision; auto: bf16-mixed (float32 master weights) "
        "where the hardware computes bf16 natively, else 32-true (runtime/precision.py).")
    deterministic: bool = Field(False, description="torch deterministic algorithms.")
    eval_batch_size: int = Field(4096, ge=1, description="Batch size for codes and evaluation.")
    checkpoint_seconds: Optional[float] = Field(300.0, gt=0, description="Also checkpoint "
        "inside an epoch after this many seconds (epoch ends: always); null: never inside.")
    fused_update: bool = Field(False, description="torch's fused optimiser update (one kernel "
        "per step) for Adam and SGD with momentum or weight decay: the same algorithm, rounded "
        "differently; faster on CPU (docs/benchmarks.md). Off by default, so that results "
        "and cache keys stay those of earlier runs. Plain SGD has its own fused step anyway.")


class PipelineConfig(StageConfig):
    """The whole main job: one config, made of one config per stage."""

    objective: Objective = Field("classify", description="'classify' (fine-tune a classifier)"
                                 " or 'reconstruct' (the deep autoencoder, section autoencoder).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _cross_stage(self) -> "PipelineConfig":
        n_layers = self.model.n_layers
        if len(self.pretrain.corruption_levels) != n_layers:
            raise ValueError(
                f"pretrain.corruption_levels has {len(self.pretrain.corruption_levels)} entries "
                f"but model.hidden_sizes has {n_layers} layers: give one level per layer"
            )
        if self.pretrain.loss == "cross_entropy":
            if self.data.normalization != "unit":
                raise ValueError(
                    "pretrain.loss='cross_entropy' needs inputs in [0,1], but "
                    f"data.normalization={self.data.normalization!r}: use normalization='unit' "
                    "or loss='squared_error'"
                )
            if n_layers > 1 and self.model.activation != "sigmoid":
                raise ValueError(
                    "pretrain.loss='cross_entropy' needs codes in [0,1] for layers 2.., but "
                    f"model.activation={self.model.activation!r}: use 'sigmoid' or "
                    "loss='squared_error'"
                )
        check_reconstruct(self)  # the rules of objective='reconstruct'
        if self.data.is_named:  # sizes known without reading a file
            plan = plan_split(self.data, MNIST_TRAIN_POOL, None)
            problems = size_problems(self.data, plan, batch_sizes(self))
            if problems:
                raise ValueError("; ".join(problems))
        return self


def batch_sizes(config: PipelineConfig) -> dict[str, int]:
    """``{"pretrain.batch_size": …, "finetune.batch_size": …}``: sizes the training set bounds."""
    return {f"{s}.batch_size": getattr(config, s).batch_size for s in ("pretrain", "finetune")}


def check_train_size(config: PipelineConfig, n_available: int) -> None:
    """Raise ``ValueError`` if ``n_train`` or a batch size exceeds the training split."""
    if config.data.n_train is not None and config.data.n_train > n_available:
        raise ValueError(
            f"data.n_train={config.data.n_train} is above the {n_available} training "
            "examples that exist"
        )
    n_train = config.data.n_train or n_available
    for section in ("pretrain", "finetune"):
        bs = getattr(config, section).batch_size
        if bs > n_train:
            raise ValueError(
                f"{section}.batch_size={bs} is larger than the training set ({n_train} examples)"
            )


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into ``{"section.field": value}`` for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in config.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value

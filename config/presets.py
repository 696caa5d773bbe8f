"""Named presets: concrete values live here and in the CLI, never in flow bodies."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Demos, tests and smoke runs: at most 5k examples, two small layers, a few epochs.
    "quick": {
        "data": {"n_train": 5000},
        "model": {"hidden_sizes": [256, 128]},
        "pretrain": {
            "epochs": 3, "batch_size": 20, "corruption_levels": [0.1, 0.2],
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        "finetune": {
            "max_epochs": 12, "batch_size": 20, "early_stopping": "patience",
            "patience_epochs": 4, "optimizer": {"name": "sgd", "lr": 0.1},
        },
    },
    # The tutorial's architecture with minibatches: 3×1000 sigmoid, masking 0.1/0.2/0.3,
    # tied weights. lr scales with the batch as in the tutorial's dA.py (batch 20, lr 0.1
    # for a summed cross-entropy) rather than SdA.py's batch-1 lr 0.001.
    "default": {
        "model": {"hidden_sizes": [1000, 1000, 1000]},
        "pretrain": {
            "epochs": 15, "batch_size": 20, "corruption_levels": [0.1, 0.2, 0.3],
            "optimizer": {"name": "sgd", "lr": 0.01},
        },
        "finetune": {
            "max_epochs": 100, "batch_size": 20, "early_stopping": "tutorial",
            "optimizer": {"name": "sgd", "lr": 0.1},
        },
    },
    # Exactly DeepLearningTutorials' SdA.py (docs/references.md): batch 1, patience rule.
    "tutorial": {
        "data": {"n_train": None, "n_valid": 10000, "normalization": "unit"},
        "model": {"hidden_sizes": [1000, 1000, 1000], "activation": "sigmoid",
                  "tied_weights": True, "init": "tutorial", "dropout": 0.0},
        "pretrain": {
            "epochs": 15, "batch_size": 1, "noise": "masking",
            "corruption_levels": [0.1, 0.2, 0.3], "loss": "cross_entropy",
            "optimizer": {"name": "sgd", "lr": 0.001},
        },
        "finetune": {
            "max_epochs": 1000, "batch_size": 1, "early_stopping": "tutorial",
            "patience_batches": 10, "patience_increase": 2.0, "improvement_threshold": 0.995,
            "optimizer": {"name": "sgd", "lr": 0.1},
        },
        # float32 whatever the hardware: the reference's arithmetic (runtime/precision.py)
        "runtime": {"precision": "32-true"},
    },
    # The deep autoencoder (objective 'reconstruct') for demos, tests and the README's table:
    # 5k examples, 784-256-64-2 with a linear 2-D code (the code map is drawn), Adam.
    "ae-small": {
        "objective": "reconstruct",
        "data": {"n_train": 5000},
        "model": {"hidden_sizes": [256, 64, 2]},
        "pretrain": {
            "epochs": 5, "batch_size": 20, "corruption_levels": [0.1, 0.2, 0.0],
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        "finetune": {
            "max_epochs": 30, "batch_size": 20, "early_stopping": "patience",
            "patience_epochs": 5, "optimizer": {"name": "adam", "lr": 0.001},
        },
        # The 2-unit code trains at the full rate (64 -> 2 does not diverge at lr 0.05);
        # the README's ae-small results were measured so.
        "autoencoder": {"code_activation": "linear", "tied_decoder": False,
                        "loss": "cross_entropy", "code_lr_scale": 1.0},
    },
    # Hinton & Salakhutdinov 2006's MNIST autoencoder: 784-1000-500-250-30, linear code,
    # untied decoder fine-tuned on cross-entropy, minibatches of 100. What differs
    # (docs/autoencoder.md): denoising autoencoders instead of RBMs for pretraining (20
    # epochs per layer, not 50), Adam instead of conjugate gradients, early stopping on
    # the validation error (the paper fine-tunes 200 epochs on all 60k images).
    "hinton2006": {
        "objective": "reconstruct",
        "model": {"hidden_sizes": [1000, 500, 250, 30], "activation": "sigmoid"},
        "pretrain": {
            "epochs": 20, "batch_size": 100, "corruption_levels": [0.1, 0.2, 0.2, 0.0],
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        "finetune": {
            "max_epochs": 200, "batch_size": 100, "early_stopping": "patience",
            "patience_epochs": 10, "optimizer": {"name": "adam", "lr": 0.001},
        },
        "autoencoder": {"code_activation": "linear", "tied_decoder": False,
                        "loss": "cross_entropy"},
    },
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of the named preset's overrides of the config defaults."""
    import copy

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])

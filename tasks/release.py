"""What a pipeline run offers for registration: the fine-tuned pretrained network as users
call it (raw inputs in, behind the run's normalisation), an input example, the identity
that lets a rerun find an earlier identical version, the words describing it, and, for the
classifier, why it must not be released (``release_problem``). MLflow is not touched here:
``tracking.registration.register_release`` records what this returns."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from config.stages import PipelineConfig
from tasks.finetune import ARMS

#: What a served version takes and returns, by kind; bump one when that changes, so that
#: versions of another format are never reused.
SERVED_FORMATS = {"classifier": "raw-pixels-probabilities-v2",  # v2: refuses non-pixels
                  "autoencoder": "raw-pixels-reconstruction-v1",
                  "encoder": "raw-pixels-code-v1"}


class Release(BaseModel):
    """The served models of one run, by kind (``classifier``, or ``autoencoder`` and
    ``encoder``), with what registering them needs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    models: dict[str, Any]  # kind -> nn.Module: float32 (n, D) raw inputs -> outputs
    example: Any  # float32 (5, D): the first raw test rows (``DataBundle.input_example``)
    identity: dict[str, str]  # checkpoint.sha256 and data.digest of the pretrained arm
    formats: dict[str, str]  # kind -> its entry of SERVED_FORMATS
    descriptions: dict[str, str]  # kind -> the version's description
    test_error: float  # the headline test score of the pretrained arm
    val_error: float  # its best validation score (what `layerwise promote` selects on)
    #: Why nothing may be registered (None: it may). Called only when no identical version
    #: exists: it reads the whole raw test split (for a variant, regenerates it).
    check: Optional[Callable[[], Optional[str]]] = None
    kept: list[str]  # the fine-tuned checkpoints, named when recording fails


def as_inputs(raw: Any) -> Any:
    """Stored features as a served model takes them: contiguous float32 (N, D)."""
    import numpy as np

    return np.ascontiguousarray(raw, dtype=np.float32)


def served_classifier(checkpoint: Any, config: PipelineConfig, data: Any,
                      pixels: bool = False) -> Any:
    """The fine-tuned classifier behind the run's normalisation: raw pixels in,
    probabilities out (``models.served.RawPixelClassifier``); with ``pixels`` (the source
    stores 8-bit pixels) it refuses requests that are clearly not values in 0-255."""
    from models.served import RawPixelClassifier
    from tasks.evaluate import load_classifier

    classifier = load_classifier(checkpoint, config, data.n_features, data.n_classes)
    return RawPixelClassifier(classifier, data.normalization, data.norm_stats,
                              pixel_range=(0.0, 255.0) if pixels else None).eval()


def served_autoencoder(checkpoint: Any, config: PipelineConfig, data: Any,
                       code: bool = False) -> Any:
    """The fine-tuned autoencoder behind the run's normalisation: raw pixels in, the
    reconstruction in their scale (or, with ``code``, the code) out."""
    from models.autoencoder import single
    from models.served import RawPixelAutoencoder
    from runtime.checkpoints import load_state
    from tasks.reconstruct import activations

    net = single(load_state(checkpoint), activations(config), config.autoencoder.loss)
    return RawPixelAutoencoder(net, data.norm_stats, code=code).eval()


def chance_error(y_train: torch.Tensor, y_test: torch.Tensor) -> tuple[float, int]:
    """The test error of always answering the most frequent training class (what a model
    that learned nothing from the features reaches), and that class.

    Args:
        y_train: int64 (N,) training labels.
        y_test: int64 (M,) test labels.
    """
    majority = int(torch.bincount(y_train).argmax())
    return float((y_test != majority).double().mean()), majority


@torch.no_grad()
def release_problem(served: torch.nn.Module, x_raw: torch.Tensor, y_test: torch.Tensor,
                    y_train: torch.Tensor, test_error: float,
                    batch_size: int = 4096) -> Optional[str]:
    """Why the served model (raw inputs in, probabilities out) must not be registered, or
    None: its outputs on the test set must all be finite, and both the run's test error and
    the served model's must beat :func:`chance_error`.

    Args:
        served: The model as registered (``models.served.RawPixelClassifier``).
        x_raw: float32 (M, D) test inputs as the dataset stores them.
        y_test: int64 (M,) test labels.
        y_train: int64 (N,) training labels (for the chance level).
        test_error: The run's test error (the pretrained arm).
        batch_size: Rows per forward pass.
    """
    outputs = torch.cat([served(x_raw[i : i + batch_size])
                         for i in range(0, len(x_raw), batch_size)])  # (M, K)
    bad_rows = int((~torch.isfinite(outputs)).any(dim=1).sum())
    if bad_rows:
        return (f"its outputs are NaN or inf on {bad_rows} of {len(x_raw)} test rows (the "
                "served model's normalisation or weights overflow)")
    served_error = float((outputs.argmax(dim=1) != y_test).double().mean())
    chance, majority = chance_error(y_train, y_test)
    worst = max(test_error, served_error)
    if worst >= chance:
        return (f"its test error {100 * worst:.2f} % is not better than chance "
                f"({100 * chance:.2f} %: always answering class {majority}, the most "
                "frequent in training)")
    return None


def classifier_release(config: PipelineConfig, data: Any, arms: dict[str, Any],
                       evaluation: Any) -> Release:
    """The pretrained classifier, checked on the whole raw test split."""
    from models.served import INPUT_DESCRIPTION, OUTPUT_DESCRIPTION

    from sources.read import raw_test_features

    model = served_classifier(arms["pretrained"].checkpoint, config, data, pixels=data.pixels)
    test_error = evaluation.arms["pretrained"].test_error
    sizes = [data.n_features, *config.model.hidden_sizes, data.n_classes]
    description = (
        f"Stacked denoising autoencoder {sizes} ({config.model.activation}), greedily "
        f"pretrained then fine-tuned. Input: {INPUT_DESCRIPTION.format(n=data.n_features)}. "
        f"The run's '{data.normalization}' normalisation (statistics from its training "
        f"split) is applied inside the model. Output: "
        f"{OUTPUT_DESCRIPTION.format(k=data.n_classes)}. Test error {100 * test_error:.2f}% "
        f"on {data.source} (data digest {data.digest[:12]}).")
    return Release(
        models={"classifier": model}, example=as_inputs(data.input_example),
        identity=identity(arms, data), descriptions={"classifier": description},
        formats={"classifier": SERVED_FORMATS["classifier"]},
        test_error=test_error, val_error=arms["pretrained"].best_val_error,
        check=lambda: release_problem(  # on (M, D) raw inputs, as the user has them
            model, torch.from_numpy(as_inputs(raw_test_features(config.data))), data.y_test,
            data.y_train, test_error),
        kept=[str(arms[a].checkpoint.path) for a in ARMS])


def autoencoder_release(config: PipelineConfig, data: Any, arms: dict[str, Any],
                        evaluation: Any) -> Release:
    """The pretrained deep autoencoder and its encoder."""
    from models.served import AE_OUTPUT_DESCRIPTION, CODE_DESCRIPTION, INPUT_DESCRIPTION

    checkpoint = arms["pretrained"].checkpoint
    sizes = [data.n_features, *config.model.hidden_sizes]
    errors = {m: evaluation.methods[m].sq_error_per_image for m in ("pretrained", "pca")}
    descriptions = {}
    for kind in ("autoencoder", "encoder"):
        output = (CODE_DESCRIPTION.format(c=sizes[-1]) if kind == "encoder"
                  else AE_OUTPUT_DESCRIPTION.format(n=data.n_features))
        descriptions[kind] = (
            f"{'Encoder of the deep' if kind == 'encoder' else 'Deep'} autoencoder {sizes} "
            f"(code {config.autoencoder.code_activation}), greedily pretrained then "
            f"fine-tuned on reconstruction. Input: "
            f"{INPUT_DESCRIPTION.format(n=data.n_features)}. The run's "
            f"'{data.normalization}' scaling is applied inside the model. Output: {output}. "
            f"Squared error per test image {errors['pretrained']:.3f} (PCA "
            f"{errors['pca']:.3f}) on {data.source} (data digest {data.digest[:12]}).")
    return Release(
        models={kind: served_autoencoder(checkpoint, config, data, code=kind == "encoder")
                for kind in ("autoencoder", "encoder")},
        example=as_inputs(data.input_example),
        identity=identity(arms, data), descriptions=descriptions,
        formats={k: SERVED_FORMATS[k] for k in ("autoencoder", "encoder")},
        test_error=errors["pretrained"], val_error=arms["pretrained"].best_val_error,
        kept=[str(arms[a].checkpoint.path) for a in ARMS])


def identity(arms: dict[str, Any], data: Any) -> dict[str, str]:
    """What makes two versions the same model: the pretrained arm's weights and the data."""
    return {"checkpoint.sha256": arms["pretrained"].checkpoint.sha256,
            "data.digest": data.digest}


@task(name="release", task_run_name="release", cache_policy=NO_CACHE, persist_result=False)
def release_task(config: PipelineConfig, data: Any, arms: dict[str, Any],
                 evaluation: Any) -> Release:
    """Prefect task: the served models of the run's objective (cheap, so never cached)."""
    build = autoencoder_release if config.objective == "reconstruct" else classifier_release
    return build(config, data, arms, evaluation)

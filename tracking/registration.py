"""The registered classifier: find a version with the same identity, or log and register a
new one with its signature, input example, tags and descriptions."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel

from runtime.console import mlflow_prints_quiet
from tracking.retries import with_retries
from tracking.tracker import Tracker, quote_filter
from tracking.vocabulary import FORMAT_TAG, NOT_REGISTERED_TAG

MODEL_DESCRIPTION = (
    "Classifiers from layerwise pipeline runs (greedy layer-wise pretraining of stacked "
    "denoising autoencoders, then fine-tuning). Each version's description says what it "
    "takes and returns; alias 'champion' marks the best on its data (`layerwise promote`)."
)


def find_model_version(tracker: Tracker, name: str, tags: dict[str, str]) -> Optional[str]:
    """The lowest READY version of registered model ``name`` carrying all ``tags``, or None
    (also when the model does not exist yet)."""
    clauses = [f"name = '{quote_filter(name)}'",
               *(f"tags.`{k}` = '{quote_filter(v)}'" for k, v in tags.items())]
    versions = with_retries(tracker.client.search_model_versions, " and ".join(clauses))
    ready = sorted(int(v.version) for v in versions if v.status == "READY")
    return str(ready[0]) if ready else None


def register_classifier(tracker: Tracker, run_id: str, model: Any, input_example: Any,
                        name: str, tags: dict[str, str], description: str,
                        artifact: str = "model") -> str:
    """Log ``model`` in run ``run_id`` as an MLflow model (pt2: no pickle) with signature and
    input example, register it as a version of ``name``, tag and describe the version (and
    the registered model, while it has no description). Returns the version number.

    Args:
        tracker: The run's tracker.
        run_id: The run that logs the model.
        model: An ``nn.Module`` mapping ``input_example``-shaped float32 arrays to outputs.
        input_example: float32 (n, D) example inputs, as a caller passes them.
        name: Registered model name.
        tags: Version tags.
        description: The version's description.
        artifact: The logged model's name within the run (a run may log several).
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.as_tensor(input_example)).numpy()
    signature = infer_signature(input_example, output)

    def log() -> Any:
        with mlflow_prints_quiet(), mlflow.start_run(run_id=run_id):
            return mlflow.pytorch.log_model(
                model, name=artifact, input_example=input_example, signature=signature,
                serialization_format="pt2", registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                # MLflow would reload the saved program and run the example through it
                # (≈ 3 s: the first torch.export.load of the process); tests/test_registry.py
                # reloads the registered model and checks it reproduces the test error.
                validate_serving_input=False,
            )

    client = tracker.client
    version = str(with_retries(log).registered_model_version)
    for key, value in tags.items():
        with_retries(client.set_model_version_tag, name, version, key, value)
    with_retries(client.update_model_version, name, version, description)
    if not with_retries(client.get_registered_model, name).description:
        with_retries(client.update_registered_model, name, MODEL_DESCRIPTION)
    return version


class Registered(BaseModel):
    """What became of a run's release: the version of each registered model (empty when
    refused), whether every one was an existing identical version, and why nothing was
    registered (None: it was)."""

    versions: dict[str, str]
    reused: bool
    refused: Optional[str] = None


def register_release(tracker: Tracker, run: str, parent: str, release: Any,
                     names: dict[str, str]) -> Registered:
    """Register each served model of ``release`` (``tasks.release.Release``) as a version of
    ``names[kind]``, logged in the evaluation run ``run``, unless a READY version with the
    same identity and format exists (it is reused) or the release's check, run once and only
    when a version is to be registered, finds a problem (nothing is registered; the reason is
    the run's tag ``layerwise.not_registered``)."""
    from runtime.errors import TrackingError

    versions: dict[str, str] = {}
    reused, checked, problem = True, False, None
    try:
        for kind, model in release.models.items():
            identity = {**release.identity, FORMAT_TAG: release.formats[kind]}
            version = find_model_version(tracker, names[kind], identity)
            if version is None and not checked:
                problem, checked = release.check() if release.check else None, True
            if version is None and problem:
                tracker.set_tags(run, {NOT_REGISTERED_TAG: problem})
                return Registered(versions={}, reused=False, refused=problem)
            if version is None:
                reused = False
                version = register_classifier(
                    tracker, run, model, release.example, names[kind],
                    {**identity, "layerwise.run_id": parent,
                     "val_error": repr(release.val_error),
                     "test_error": repr(release.test_error)},
                    description=release.descriptions[kind],
                    artifact="model" if kind == "classifier" else kind)
            versions[kind] = version
    except Exception as exc:  # noqa: BLE001 - whatever broke, say where the work is
        raise TrackingError(f"could not log or register the {' and '.join(release.models)} "
                            f"in MLflow ({exc}); the fine-tuned weights are kept at "
                            f"{', '.join(release.kept)}") from exc
    return Registered(versions=versions, reused=reused)

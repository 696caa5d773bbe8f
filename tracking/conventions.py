"""What an MLflow or Prefect user looks for first: who ran it from which source and commit,
on which data, under a name that tells runs apart, with a description.

MLflow's fluent ``mlflow.start_run`` fills the ``mlflow.*`` system tags from its context
providers; ``Tracker`` creates runs with ``MlflowClient.create_run`` (explicit run ids, no
global state), so it sets them from here.
"""

from __future__ import annotations

import functools
import getpass
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

EXPERIMENT_DESCRIPTION = (
    "layerwise: greedy layer-wise pretraining of stacked denoising autoencoders vs random "
    "initialisation. Parent runs (tag layerwise.kind) hold the config as params and "
    "test/error_pretrained, test/error_random, test/error_diff; one child run per stage.")
#: The experiment tag by which the MLflow UI tells model training from GenAI work (without
#: it, MLflow 3 opens an experiment in its GenAI view: traces, latency, token usage).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SPLITS = (("train", "x_train", "training"), ("valid", "x_valid", "validation"),
          ("test", "x_test", "test"))
ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def system_tags(source_name: str) -> dict[str, str]:
    """``mlflow.user``, ``mlflow.source.type/name`` and, in a git checkout, the commit
    (a plain SHA: MLflow links it; the ``git.commit`` param adds ``-dirty``) and branch."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.type": "LOCAL",
            "mlflow.source.name": source_name}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def run_name(preset: str, seed: int, when: Optional[datetime] = None) -> str:
    """``<preset>-s<seed>-<UTC mmdd-HHMMSS>`` (``quick-s0-1207-054738``): the MLflow parent
    run and the Prefect flow run carry it, so runs can be matched across the two UIs. Short,
    so that the MLflow runs list (which cuts names at about 18 characters) tells runs apart
    by their start; the year is in the run's start time beside it."""
    when = when or datetime.now(timezone.utc)
    return f"{preset}-s{seed}-{when.astimezone(timezone.utc):%m%d-%H%M%S}"


def run_description(kind: str, preset: str, config: Any) -> str:
    """One paragraph for the run's description field."""
    m = config.model
    what = (" (objective reconstruct: the deep autoencoder against PCA)"
            if getattr(config, "objective", "classify") == "reconstruct" else "")
    sizes = ", ".join(str(n) for n in m.hidden_sizes)  # no "[64, 32]": Markdown link text
    return (f"layerwise {kind}{what}, preset '{preset}', seed {config.runtime.seed}: hidden "
            f"layers of {sizes} units ({m.activation}), data {config.data.dataset}, "
            f"normalisation '{config.data.normalization}'. Pretrained and random-init arms "
            "are the child runs finetune-pretrained and finetune-random.")


def results_note(experiment_id: str, arm_runs: list[str], model: str, version: str) -> str:
    """The parent's description's second paragraph: links to its registered model version
    (logged by its ``evaluate`` child, so MLflow's own "Registered models" field of the
    parent is empty) and to the comparison view of the two arms' runs, where their
    ``finetune/*`` curves are overlaid (the parent's chart view nests them)."""
    from tracking.links import compare_link, model_version_link

    return (f"Registered model: [{model} version {version}]"
            f"({model_version_link(model, version)}). Both arms' learning curves overlaid: "
            f"[compare finetune-pretrained with finetune-random]"
            f"({compare_link(experiment_id, arm_runs)}).")


def stage_description(stage: str, objective: str = "classify") -> str:
    """One line for a stage run's description field."""
    if objective == "reconstruct" and stage.startswith("finetune-"):
        return (f"Fine-tuning of the unrolled autoencoder, {stage.split('-', 1)[1]}-init arm, on "
                "reconstruction; its metrics are finetune/*, the same keys as the other arm's.")
    if objective == "reconstruct" and stage == "evaluate":
        return ("Squared error per test image, loss and k-NN accuracy of both arms and PCA; "
                "reconstructions, code map, learning curves; the registered models.")
    if stage.startswith("pretrain-layer-"):
        k = stage.rsplit("-", 1)[1]
        return (f"Greedy pretraining of layer {k}: a denoising autoencoder on the clean codes "
                "of the layers below; weights, reconstructions and filters.")
    if stage.startswith("finetune-"):
        arm = stage.split("-", 1)[1]
        return (f"Supervised fine-tuning of the {arm}-init arm; its metrics are finetune/*, "
                "the same keys as the other arm's, so the UI overlays them.")
    return {"load-data": "Load, verify, split and normalise the data; its digest and stats.",
            "evaluate": "Test error of both arms, confusion matrices, learning curves; the "
                        "registered model."}.get(stage, stage)


def dataset_inputs(data: Any, source: str) -> list[Any]:
    """The training, validation and test splits as MLflow dataset inputs (the UI's Dataset
    column). MLflow stores at most 36 characters of a digest: the first 36 hex digits of
    the data stage's digest; the full one is in the profile and the ``data.digest`` param."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for split, attr, context in SPLITS:
        x = getattr(data, attr)  # (N, D) float32
        profile = {"num_rows": int(x.shape[0]), "num_features": int(x.shape[1]),
                   "normalization": data.normalization, "data_digest": data.digest}
        schema = {"mlflow_tensorspec": {"features": json.dumps([{
            "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, int(x.shape[1])]}
        }]), "targets": None}}
        dataset = Dataset(name=f"{Path(data.source).stem}-{split}", digest=data.digest[:36],
                          source_type="local", source=json.dumps({"uri": source}),
                          schema=json.dumps(schema), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    return inputs

"""The reconstruct objective's final report on the test split: squared error per image and
fine-tuning loss of the pretrained autoencoder, the random-init one and PCA with the same
code size; k-NN accuracy of each code on the test labels; the comparison figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from config.stages import PipelineConfig
from runtime.checkpoints import load_state
from runtime.devices import eval_device
from runtime.keys import stage_dir, stage_key
from tasks.finetune import ARMS

#: The rows of the report: both autoencoder arms, then the linear baseline.
METHODS = (*ARMS, "pca")
N_EXAMPLES = 10  # test images in the reconstruction figure
CE_CLAMP = 1e-6  # PCA reconstructions leave [0,1]: clamped to score the cross-entropy


class MethodEvaluation(BaseModel):
    """Test-set scores of one method (an autoencoder arm or PCA)."""

    method: str
    sq_error_per_image: float  # Σ_pixels (x − z)², mean over test images, pixels in [0,1]
    loss: float  # the fine-tuning loss (autoencoder.loss) on the test images
    knn_accuracy: float  # k-NN on the codes, training codes as the reference set


class ReconstructEvaluation(BaseModel):
    """All methods, the pretrained − random difference, and the figure files."""

    methods: dict[str, MethodEvaluation]
    error_diff: float
    n_test: int
    code_size: int
    knn_k: int
    files: dict[str, Path]
    val_error_pretrained: float  # the pretrained arm's best validation squared error
    artifacts_key: str  # what the files are a function of: data, checkpoints, k


def pca_fit(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of training inputs x (N, D), from the SVD of the centred data.

    Returns:
        mean (D,), the top-k components (k, D) as rows, and every eigenvalue of the
        covariance C = X_cᵀX_c / N in decreasing order (min(N, D),): λ_i = s_i² / N.
    """
    x = x.double()
    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)  # x_c = U diag(s) Vᵀ
    return mean, vh[:k], s**2 / len(x)


def pca_encode(x: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """The PCA code c = V_kᵀ (x − μ): (N, D) -> (N, k)."""
    return (x.double() - mean) @ components.t()


def pca_decode(codes: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """The reconstruction z = μ + V_k c: (N, k) -> (N, D)."""
    return codes @ components + mean


@torch.no_grad()
def knn_accuracy(train_codes: torch.Tensor, y_train: torch.Tensor, test_codes: torch.Tensor,
                 y_test: torch.Tensor, k: int, chunk: int = 512) -> float:
    """Accuracy of the k-nearest-neighbour vote (Euclidean; ties to the smallest label) of
    each test code among the training codes.

    Args:
        train_codes, y_train: Reference codes (N, c) and labels (N,).
        test_codes, y_test: Query codes (M, c) and labels (M,).
        k: Neighbours.
        chunk: Queries per distance block (chunk × N distances at once).
    """
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    right = 0
    for s in range(0, len(test_codes), chunk):
        d = torch.cdist(test_codes[s:s + chunk].double(), train_codes.double())  # (m, N)
        idx = d.topk(min(k, len(train_codes)), dim=1, largest=False).indices  # (m, k)
        votes = torch.nn.functional.one_hot(y_train[idx], n_classes).sum(dim=1)  # (m, C)
        right += int((votes.argmax(dim=1) == y_test[s:s + chunk]).sum())
    return right / len(test_codes)


def scores(x: torch.Tensor, z: torch.Tensor, loss: str) -> tuple[float, float]:
    """(squared error per image, the fine-tuning loss) of reconstructions z of x (N, D)."""
    from models.autoencoder import squared_error
    from models.dae import reconstruction_loss

    z = z.double()
    x = x.double()
    if loss == "cross_entropy":  # from probabilities: the loss of logits log(z / (1 − z))
        zc = z.clamp(CE_CLAMP, 1 - CE_CLAMP)
        value = reconstruction_loss(x, torch.log(zc) - torch.log1p(-zc), loss)
    else:
        value = reconstruction_loss(x, z, loss)
    return float(squared_error(x, z)), float(value)


@torch.no_grad()
def codes_and_outputs(state: dict[str, torch.Tensor], config: PipelineConfig, x: torch.Tensor,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An autoencoder's codes (N, c) and reconstructions (N, D) of x, on the CPU."""
    from models.autoencoder import single
    from tasks.reconstruct import activations

    net = single(state, activations(config), config.autoencoder.loss).to(device)
    codes, outputs = [], []
    for s in range(0, len(x), config.runtime.eval_batch_size):
        h = net.encode(x[s:s + config.runtime.eval_batch_size].to(device))  # (1, b, c)
        codes.append(h[0].cpu())
        outputs.append(net.decode(h)[0].cpu())
    return torch.cat(codes), torch.cat(outputs)


def evaluate_reconstruction(config: PipelineConfig, data: Any, results: dict[str, Any],
                            out_dir: Path) -> ReconstructEvaluation:
    """Score both arms and PCA on the test split; draw the figures into ``out_dir``."""
    from reports import autoencoder_figures as figs

    device, a = eval_device(config.runtime), config.autoencoder
    code_size = config.model.hidden_sizes[-1]
    codes, recons = {}, {}
    for arm in ARMS:
        state = load_state(results[arm].checkpoint)
        train_codes = codes_and_outputs(state, config, data.x_train, device)[0]
        test_codes, recons[arm] = codes_and_outputs(state, config, data.x_test, device)
        codes[arm] = (train_codes, test_codes)
    mean, components, _ = pca_fit(data.x_train, code_size)
    codes["pca"] = tuple(pca_encode(x, mean, components) for x in (data.x_train, data.x_test))
    recons["pca"] = pca_decode(codes["pca"][1], mean, components)
    methods = {}
    for method in METHODS:
        sq, loss = scores(data.x_test, recons[method], a.loss)
        acc = knn_accuracy(codes[method][0], data.y_train, codes[method][1], data.y_test,
                           a.knn_k)
        methods[method] = MethodEvaluation(method=method, sq_error_per_image=sq, loss=loss,
                                           knn_accuracy=acc)
    shape = data.image_shape or (28, 28)
    files = {
        "reconstructions": figs.save_reconstructions(
            data.x_test[:N_EXAMPLES],
            {m: recons[m][:N_EXAMPLES] for m in ("pca", "random", "pretrained")},
            out_dir / "reconstructions.png", shape),
        "learning_curves": figs.save_autoencoder_curves(
            {arm: results[arm].history for arm in ARMS}, out_dir / "learning_curves.png"),
    }
    if code_size == 2:
        files["code_map"] = figs.save_code_map(
            {"PCA": codes["pca"][1], "pretrained autoencoder": codes["pretrained"][1]},
            data.y_test, out_dir / "code_map.png")
    return ReconstructEvaluation(
        methods=methods, n_test=len(data.x_test), code_size=code_size, knn_k=a.knn_k,
        error_diff=(methods["pretrained"].sq_error_per_image
                    - methods["random"].sq_error_per_image),
        files=files, val_error_pretrained=results["pretrained"].best_val_error,
        artifacts_key=":".join(["evaluate-reconstruction", data.digest,
                                *(results[arm].checkpoint.sha256 for arm in ARMS),
                                str(a.knn_k)]))


@task(name="evaluate-reconstruction", task_run_name="evaluate", cache_policy=NO_CACHE,
      persist_result=False)
def evaluate_reconstruction_task(config: PipelineConfig, data: Any,
                                 results: dict[str, Any]) -> ReconstructEvaluation:
    """Prefect task: evaluate both arms and PCA (cheap, so never cached)."""
    key = stage_key("evaluate-reconstruction", kind="evaluate", data=data.digest,
                    knn_k=config.autoencoder.knn_k,
                    checkpoints=[results[a].checkpoint.sha256 for a in ARMS])
    return evaluate_reconstruction(config, data, results,
                                   stage_dir("evaluate-reconstruction", key))

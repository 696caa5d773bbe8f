"""Greedy layer-wise pretraining: train denoising autoencoder k on the clean codes of
layers 1..k-1 (Bengio et al. 2007; Vincent et al. 2010, §3.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from runtime.checkpoints import Checkpoint, load_state, save_state, tensor_sha256
from config.autoencoder import layer_activation, layer_optimizer
from config.stages import PipelineConfig
from runtime.errors import DivergenceError
from runtime.progress import current_observer
from runtime.devices import eval_device
from runtime.keys import Seed, derive_seed, runtime_key, stage_dir, stage_key
from training.trainer import make_trainer
from tasks.pretrain_figures import layer_figures


class LayerResult(BaseModel):
    """What pretraining layer k hands on: its checkpoint, digests, history and figures."""

    layer: int
    n_visible: int
    n_hidden: int
    checkpoint: Checkpoint
    encoder_sha256: str
    value_range: tuple[float, float]
    history: list[dict[str, float]]
    figures: dict[str, Path]
    train_seconds: float


def encoder_state(dae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's own tensors (``linear.weight``, ``linear.bias``) from a dA state."""
    prefix = "encoder."
    return {k[len(prefix) :]: v for k, v in dae_state.items() if k.startswith(prefix)}


def load_stack(lower: Sequence[LayerResult]) -> list[dict[str, torch.Tensor]]:
    """Load and verify the dA states of the given layers."""
    return [load_state(r.checkpoint) for r in lower]


@torch.no_grad()
def compute_codes(
    x: torch.Tensor,
    dae_states: Sequence[dict[str, torch.Tensor]],
    activation: str,
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """Clean codes h_{k-1}(…h_1(x)) of the given layers, in large batches, once per stage.

    Args:
        x: Inputs, (N, D), on the CPU.
        dae_states: dA states of layers 1..k-1, bottom first (empty: codes are x itself).
    Returns:
        (N, n_hidden_{k-1}) codes on ``device``.
    """
    from models.layers import EncoderLayer

    x = x.to(device)
    if not dae_states:
        return x
    layers = []
    for state in dae_states:
        enc = encoder_state(state)
        n_hidden, n_visible = enc["linear.weight"].shape
        layer = EncoderLayer(n_visible, n_hidden, activation).to(device)
        layer.load_state_dict(enc)
        layers.append(layer)
    out = []
    for start in range(0, len(x), batch_size):
        h = x[start : start + batch_size]
        for layer in layers:
            h = layer(h)  # (b, n_in) -> (b, n_out)
        out.append(h)
    return torch.cat(out)


def build_dae(k: int, config: PipelineConfig, n_visible: int,
              value_range: tuple[float, float]) -> Any:
    """The untrained dA of layer ``k`` (0-based), its initial weights drawn from
    ``derive_seed(seed, Seed.PRETRAIN_INIT, k)``."""
    from models.dae import DenoisingAutoencoder

    m, p, rt = config.model, config.pretrain, config.runtime
    return DenoisingAutoencoder(
        n_visible=n_visible,
        n_hidden=m.hidden_sizes[k],
        activation=layer_activation(config, k),  # a linear code layer for reconstruct
        init=m.init,
        tied=m.tied_weights,
        noise=p.noise,
        corruption_level=p.corruption_levels[k],
        loss=p.loss,
        value_range=value_range,
        generator=torch.Generator().manual_seed(derive_seed(rt.seed, Seed.PRETRAIN_INIT, k)),
    )


def check_members(configs: Sequence[PipelineConfig]) -> None:
    """Members of a population must differ in ``runtime.seed`` only (and be distinct)."""
    if not configs:
        raise ValueError("a population needs at least one member")
    seeds = [c.runtime.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"population members need distinct seeds; got {seeds}")
    first = seedless(configs[0])
    for config in configs[1:]:
        if seedless(config) != first:
            raise ValueError("population members may differ in runtime.seed only")


def seedless(config: PipelineConfig) -> dict[str, Any]:
    """The config as JSON-able data without ``runtime.seed``: equal for population members."""
    dump = config.model_dump(mode="json")
    dump["runtime"].pop("seed")
    return dump


def pretrain_layers(k: int, configs: Sequence[PipelineConfig], data: Any,
                    lowers: Sequence[Sequence[LayerResult]], out_dirs: Sequence[Path]
                    ) -> list[LayerResult]:
    """Train the dA of layer ``k`` (0-based) of P >= 1 stacks as one population, each on
    the clean codes of its own layers below; a single run is P = 1.

    Corruption is applied only to the autoencoder's input, only in training; its loss is
    measured against the clean codes. Writes member p's ``dae.safetensors`` and figures to
    ``out_dirs[p]``.

    Args:
        configs: One config per member; they differ in ``runtime.seed`` only.
        data: The shared ``DataBundle``.
        lowers: Member p's layers 1..k (its own stack below layer k).
        out_dirs: Where member p's files go.
    Raises:
        DivergenceError: a member's loss became NaN/inf (the message names its seed).
    """
    from training.dae_training import train_dae_population

    check_members(configs)
    if not len(lowers) == len(out_dirs) == len(configs):
        raise ValueError(f"{len(lowers)} lower stacks and {len(out_dirs)} directories for "
                         f"{len(configs)} members")
    m, p, rt = configs[0].model, configs[0].pretrain, configs[0].runtime
    device = eval_device(rt)
    states = [load_stack(lower) for lower in lowers]
    if k == 0:  # every member reads the same inputs (N, D)
        x_train, x_valid = data.x_train.to(device), data.x_valid.to(device)
        ranges = [(float(x_train.min()), float(x_train.max()))] * len(configs)
    else:  # member p reads its own codes: (P, N, n_hidden_{k-1})
        x_train, x_valid = (torch.stack([compute_codes(x, s, m.activation, device,
                                                       rt.eval_batch_size) for s in states])
                            for x in (data.x_train, data.x_valid))
        ranges = [(float(x.min()), float(x.max())) for x in x_train]
    daes = [build_dae(k, c, x_train.shape[-1], r) for c, r in zip(configs, ranges)]
    seeds = [c.runtime.seed for c in configs]
    try:
        result = train_dae_population(
            daes, x_train, x_valid,
            noise_seeds=[derive_seed(s, Seed.PRETRAIN_NOISE, k) for s in seeds],
            order_seeds=[derive_seed(s, Seed.PRETRAIN_ORDER, k) for s in seeds],
            batch_size=p.batch_size,
            optimizer={**layer_optimizer(configs[0], k), "fused": rt.fused_update},
            eval_batch_size=rt.eval_batch_size, stage=f"pretrain/layer_{k + 1}",
            names=[f"seed {s}" for s in seeds], trainer=make_trainer(rt, p.epochs),
            observer=current_observer(), resume_dir=out_dirs[0] / "resume",
            checkpoint_seconds=rt.checkpoint_seconds)
    except FloatingPointError as exc:
        raise DivergenceError(f"{exc}. Lower pretrain.optimizer.lr or check the input "
                              "normalisation.") from exc
    results = []
    for i, (dae, state, out_dir) in enumerate(zip(daes, result.states, out_dirs)):
        dae.load_state_dict(state)
        dae.eval()
        checkpoint = save_state(state, out_dir / "dae.safetensors",
                                {"layer": str(k + 1), "seed": str(seeds[i])})
        codes_valid = x_valid if k == 0 else x_valid[i]
        results.append(LayerResult(
            layer=k + 1, n_visible=dae.n_visible, n_hidden=dae.n_hidden,
            checkpoint=checkpoint, encoder_sha256=tensor_sha256(encoder_state(state)),
            value_range=ranges[i], history=result.histories[i],
            figures=layer_figures(k, dae, states[i], codes_valid.cpu(), data, out_dir,
                                  seeds[i], epochs=p.epochs),
            train_seconds=result.seconds / len(configs)))
    return results


def pretrain_layer(k: int, config: PipelineConfig, data: Any, lower: Sequence[LayerResult],
                   out_dir: Path) -> LayerResult:
    """Train the dA of layer ``k`` (0-based) of one stack: ``pretrain_layers`` at P = 1."""
    return pretrain_layers(k, [config], data, [lower], [out_dir])[0]


def pretrain_cache_key(k: int, config: PipelineConfig, data_digest: str,
                       lower: Sequence[LayerResult]) -> str:
    """Depends on what layer k's training reads, and nothing else: layers above k, the
    fine-tuning settings and dropout do not invalidate it."""
    m, p, rt = config.model, config.pretrain, config.runtime
    return stage_key(
        f"pretrain-layer-{k + 1}",
        kind="pretrain",
        data=data_digest,
        model={"hidden_sizes": m.hidden_sizes[: k + 1],
               "activation": layer_activation(config, k),
               "tied_weights": m.tied_weights, "init": m.init},
        pretrain={**p.model_dump(mode="json", exclude={"corruption_levels"}),
                  "corruption_level": p.corruption_levels[k],
                  "optimizer": layer_optimizer(config, k)},
        runtime=runtime_key(rt),
        lower=[r.checkpoint.sha256 for r in lower],
    )


def _cache_key(ctx: Any, params: dict[str, Any]) -> str:
    return pretrain_cache_key(params["k"], params["config"], params["data"].digest,
                              params["lower"])


@task(
    name="pretrain-layer",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key),
    persist_result=True,
    result_serializer="json",
)
def pretrain_layer_task(
    k: int, config: PipelineConfig, data: Any, lower: list[LayerResult]
) -> LayerResult:
    """Prefect task: pretrain layer k; cached on configs and digests, never on tensors."""
    key = pretrain_cache_key(k, config, data.digest, lower)
    return pretrain_layer(k, config, data, lower, stage_dir(f"pretrain-layer-{k + 1}", key))


def layer_states(lower: Optional[Sequence[LayerResult]]) -> list[dict[str, torch.Tensor]]:
    """The encoder states of pretrained layers, verified against their digests."""
    return [encoder_state(s) for s in load_stack(lower or [])]

"""``runtime.fused_update``: torch's one-kernel optimiser update, opt-in. The same Adam,
rounded differently; off, every cache key is the one earlier runs wrote."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from config.overrides import resolve_config

#: Keys computed by the code before the setting existed (the same config, float32).
EARLIER_KEYS = {
    "quick": ("7934a9c51b706b6a21d4992f3c29746f60072f8d9593611c2029c891a50f26bc",
              "7a8608263b7487cc5b7002162a933ef8351683921de8aae298ed33d6e5e61b08",
              "730aadc98610da2cc4f548d44d716e57f2189d2909d8d1522f92f6fd80eaf826"),
    "hinton2006": ("15398890a5d1f8540374bd7d7f6b0071dcee24254b33391e0c2c4b84b647ead3",
                   "bb8c862e115b3579c2ab93b9ce8c890b4a94ce407df702a63f2e11cbdc957b8f",
                   "344610cea29d872a4945618aafb31ecba4e4b5559f2024bb89963b9ae0440ca0"),
}


def _keys(config) -> tuple[str, str, str]:
    from tasks.finetune import finetune_cache_key
    from tasks.pretrain import pretrain_cache_key
    from tasks.reconstruct import autoencoder_cache_key

    digest = "d" * 64
    return (pretrain_cache_key(0, config, digest, []),
            finetune_cache_key("random", config, digest, None),
            autoencoder_cache_key("random", config, digest, None))


@pytest.mark.parametrize("preset", sorted(EARLIER_KEYS))
def test_off_the_cache_keys_are_those_of_earlier_runs_and_on_they_differ(preset):
    off = resolve_config(preset, sets=["runtime.precision=32-true"])
    on = resolve_config(preset, sets=["runtime.precision=32-true", "runtime.fused_update=true"])
    assert off.runtime.fused_update is False
    assert _keys(off) == EARLIER_KEYS[preset]
    assert all(a != b for a, b in zip(_keys(on), _keys(off)))


def test_the_setting_reaches_the_optimiser_of_every_training_stage(monkeypatch, tmp_path):
    """The autoencoders' fine-tuning builds a fused Adam when it is on and torch's default
    one when it is off; both train the same steps to within rounding."""
    import tasks.reconstruct as reconstruct
    import training.engine as engine

    from test_autoencoder import _daes

    built = []
    real = engine.build_optimizer

    def spy(params, settings):
        built.append(real(params, settings))
        return built[-1]

    monkeypatch.setattr(engine, "build_optimizer", spy)
    monkeypatch.setattr(reconstruct, "load_stack", lambda encoders: _daes([16, 8, 2], True))
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(x_train=torch.rand(60, 16, generator=g),
                           x_valid=torch.rand(20, 16, generator=g), n_features=16)
    histories = {}
    for fused in (False, True):
        config = resolve_config("ae-small", sets=[
            "model.hidden_sizes=[8,2]", "pretrain.corruption_levels=[0.1,0.0]",
            "finetune.max_epochs=3", "finetune.batch_size=10", "finetune.early_stopping=none",
            "runtime.accelerator=cpu", "runtime.precision=32-true",
            f"runtime.fused_update={str(fused).lower()}"])
        twins = reconstruct.finetune_autoencoders(config, data, [None, None], tmp_path / str(fused))
        assert isinstance(built[-1], torch.optim.Adam)
        assert bool(built[-1].defaults.get("fused")) is fused
        histories[fused] = [row["train_loss"] for row in twins.arms["random"].history]
    assert histories[True] == pytest.approx(histories[False], rel=1e-5)



@pytest.mark.parametrize("fused", [False, True])
def test_a_member_that_stops_leaves_the_others_state_to_the_fused_update(fused):
    """When a member stops early the engine rebuilds the optimiser over the members left,
    carrying their moments; with the fused update too, the survivor goes on as if alone."""
    from models.autoencoder import AutoencoderPopulation, random_state
    from training.engine import _slice_optimizer
    from training.optim import build_optimizer

    settings = {"name": "adam", "lr": 1e-2, "fused": fused}
    states = [random_state([12, 6, 3], ["sigmoid", "linear"], "tutorial", False,
                           torch.Generator().manual_seed(s)) for s in (0, 1)]
    x = torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(2))

    def steps(population, opt, inputs, n):
        for _ in range(n):
            loss = population.forward(inputs).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    pair = AutoencoderPopulation(states, ["sigmoid", "linear"], "cross_entropy")
    opt = build_optimizer(pair.parameters(), settings)
    steps(pair, opt, x, 3)
    old = list(pair.parameters())
    keep = torch.tensor([1])
    pair.select(keep)
    opt = _slice_optimizer(old, list(pair.parameters()), opt, settings, keep)
    steps(pair, opt, x[1:], 3)

    alone = AutoencoderPopulation(states[1:], ["sigmoid", "linear"], "cross_entropy")
    alone_opt = build_optimizer(alone.parameters(), settings)
    steps(alone, alone_opt, x[1:], 6)
    for a, b in zip(pair.parameters(), alone.parameters()):
        assert torch.allclose(a, b, atol=1e-6)

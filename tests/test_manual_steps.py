"""``models.optim.ManualSteps``: the training modules' optimiser step, which skips
Lightning's per-step machinery when it would do nothing, and must then be indistinguishable
from Lightning's own ``manual_backward`` + ``LightningOptimizer.step``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from models.batches import TensorDataModule
from models.callbacks import EpochHistory
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from models.finetune_module import LitClassifier
from models.optim import ManualSteps
from models.pretrain_module import LitDenoisingAutoencoder
from tasks.config import RuntimeConfig
from tasks.runtime import make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU

N, D, BATCH, EPOCHS = 60, 20, 7, 2
STEPS = EPOCHS * math.ceil(N / BATCH)


class CountBackward(L.Callback):
    """A callback that relies on a per-step hook."""

    def __init__(self):
        self.calls = 0

    def on_after_backward(self, trainer, pl_module):
        self.calls += 1


def fit(kind: str, optimizer: dict, callbacks=(), precision: str = "32-true"):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, D, generator=g)
    y = torch.arange(N) % 3
    if kind == "dae":
        model = DenoisingAutoencoder(D, 6, corruption_level=0.2,
                                     generator=torch.Generator().manual_seed(2))
        system, tensors = LitDenoisingAutoencoder(model, layer=1, optimizer=optimizer, seed=1), (x,)
    else:
        model = DeepClassifier.random_init(D, [8, 6], 3, generator=torch.Generator().manual_seed(2))
        system, tensors = LitClassifier(model, "random", optimizer), (x, y)
    history = EpochHistory(system.prefix)
    trainer = make_trainer(RuntimeConfig(accelerator="cpu", precision=precision), EPOCHS,
                           [history, *callbacks])
    trainer.fit(system, datamodule=TensorDataModule(tensors, tensors, BATCH, seed=5))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, history.rows, trainer.global_step, system.steps.lean


OPTIMIZERS = [{"name": "sgd", "lr": 0.1},
              {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
              {"name": "adam", "lr": 1e-3}]


@pytest.mark.parametrize("kind", ["dae", "classifier"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "nesterov", "adam"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_lean_step_equals_lightnings_own(kind, optimizer, precision, monkeypatch):
    """Bit-identical weights, the same history (global step included) and step count."""
    lean = fit(kind, optimizer, precision=precision)
    monkeypatch.setattr(ManualSteps, "enabled", False)
    own = fit(kind, optimizer, precision=precision)
    assert lean[3] is True and own[3] is False  # each path really ran
    assert lean[2] == own[2] == STEPS
    assert lean[1] == own[1] and [r["step"] for r in lean[1]] == [STEPS // 2, STEPS]
    assert lean[0].keys() == own[0].keys()
    assert all(torch.equal(lean[0][k], own[0][k]) for k in lean[0])


@pytest.mark.parametrize("kind", ["dae", "classifier"])
def test_a_callback_with_a_step_hook_gets_lightnings_path_and_every_call(kind):
    counter = CountBackward()
    _, _, steps, lean = fit(kind, OPTIMIZERS[0], callbacks=[counter])
    assert lean is False and counter.calls == steps == STEPS

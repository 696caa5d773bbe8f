"""An interrupt Python swallowed (a ``KeyboardInterrupt`` raised inside a garbage-collector
callback is only printed) is raised again at the next chunk of training."""

from __future__ import annotations

import pytest
import torch

from models.dae import DenoisingAutoencoder
from models.population_training import DAESystem
from runtime import environment as runtime
from config.stages import RuntimeConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU


def train(epochs: int = 2) -> DAESystem:
    x = torch.rand(40, 10, generator=torch.Generator().manual_seed(0))
    system = DAESystem([DenoisingAutoencoder(10, 4)], x, x, noise_seeds=[0], order_seeds=[0],
                       batch_size=5, optimizer={"name": "sgd", "lr": 0.1})
    trainer = runtime.make_trainer(RuntimeConfig(accelerator="cpu"), epochs)
    runtime.fit(trainer, system)
    return system


def test_a_remembered_interrupt_stops_training_at_the_next_chunk(monkeypatch):
    monkeypatch.setattr(runtime, "_INTERRUPTS", [])
    assert train().trainer.current_epoch == 2  # nothing pending: trains to the end
    swallowed = runtime.note_interrupt("signal 2")
    assert isinstance(swallowed, KeyboardInterrupt)  # ... and, say, lost in a GC callback
    with pytest.raises(KeyboardInterrupt, match="training interrupted"):
        train()

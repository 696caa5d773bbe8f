"""Precision: ``auto`` resolves from the hardware, and bf16-mixed training is what a loop of
single steps, each under its own ``torch.autocast``, computes.

The second check guards against stale bf16 weights: Lightning runs a whole chunk of steps in
one autocast region and the fused steps change the weights in place, so a cached bf16 copy
(``torch.autocast``'s default ``cache_enabled=True``; Lightning passes False) would make
every step of a chunk compute with the chunk's first weights.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from config.stages import RuntimeConfig
from training.batches import epoch_permutation
from models.classifier import DeepClassifier
from training.classifier_population import ClassifierPopulation
from models.dae import DenoisingAutoencoder
from training.population import DAEPopulation
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from runtime import precision
from runtime.devices import precision_used
from training.trainer import make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU

N, D, H, C, B, LR = 60, 30, 16, 4, 20, 0.5  # 3 steps of batch 20: one chunk


def _cpu(prec: str) -> RuntimeConfig:
    return RuntimeConfig(accelerator="cpu", precision=prec)


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point ``cpu_flags`` at a written /proc/cpuinfo; returns a function that writes it."""

    def write(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nflags\t\t: other\n")
        monkeypatch.setattr(precision, "CPUINFO", str(path))
        precision.cpu_flags.cache_clear()

    yield write
    precision.cpu_flags.cache_clear()


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f avx512_bf16", "bf16-mixed"),
    ("fpu sse2 avx2 amx_tile amx_bf16", "bf16-mixed"),
    ("fpu sse2 avx2 avx512f avx512_vnni", "32-true"),  # AVX-512 without BF16: emulated
])
def test_auto_precision_follows_the_cpu_flags(cpuinfo, flags, expected):
    cpuinfo(flags)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision_used(RuntimeConfig(accelerator="cpu", precision="auto")) == expected
    # an explicit setting is kept whatever the hardware
    assert precision_used(RuntimeConfig(accelerator="cpu", precision="32-true")) == "32-true"
    assert precision.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_auto_precision_is_float32_on_other_devices():
    assert precision.resolve_precision("auto", "mps") == "32-true"
    assert precision_used(RuntimeConfig(accelerator="mps", precision="auto")) == "32-true"


def test_cpu_flags_read_the_first_flags_line(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: a avx512_bf16 b\nflags\t\t: c\n")
    monkeypatch.setattr(precision, "CPUINFO", str(path))
    precision.cpu_flags.cache_clear()
    assert precision.cpu_flags() == frozenset({"a", "avx512_bf16", "b"})
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "missing"))
    precision.cpu_flags.cache_clear()
    assert precision.cpu_flags() == frozenset()
    precision.cpu_flags.cache_clear()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _dae():
    return DenoisingAutoencoder(D, H, corruption_level=0.2,
                                generator=torch.Generator().manual_seed(1))


def _classifier():
    return DeepClassifier.random_init(D, [H, H], C, generator=torch.Generator().manual_seed(2))


def _order():
    return [epoch_permutation(N, 5, 0)[s:s + B].unsqueeze(0) for s in range(0, N, B)]  # (1, b)


def test_bf16_mixed_dae_steps_each_see_the_updated_weights():
    x, _ = _data()
    pop = DAEPopulation([_dae()]).train()
    noise = [torch.Generator().manual_seed(3)]
    for idx in _order():  # the reference: one autocast region per step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pop.sgd_step(x[idx], noise, LR)
    runs = {prec: train_dae_population(
        [_dae()], x, None, noise_seeds=[3], order_seeds=[5], batch_size=B,
        optimizer={"name": "sgd", "lr": LR}, trainer=make_trainer(_cpu(prec), 1))
        for prec in ("bf16-mixed", "32-true")}
    w_bf16 = runs["bf16-mixed"].states[0]["encoder.linear.weight"]
    w_fp32 = runs["32-true"].states[0]["encoder.linear.weight"]
    assert w_bf16.dtype == torch.float32  # float32 master weights
    torch.testing.assert_close(w_bf16, pop.W.detach()[0], rtol=0, atol=1e-6)
    # bf16 products: a rounding-sized difference from float32 (bf16 has 8 mantissa bits)
    assert 1e-5 < (w_bf16 - w_fp32).abs().max() < 2e-2


def test_bf16_mixed_classifier_steps_each_see_the_updated_weights():
    x, y = _data()
    pop = ClassifierPopulation([_classifier()]).train()
    for idx in _order():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pop.sgd_step(x[idx], y[idx], LR)
    runs = {prec: train_classifier_population(
        [_classifier()], x, y, x, y, order_seeds=[5], batch_size=B,
        optimizer={"name": "sgd", "lr": LR}, trainer=make_trainer(_cpu(prec), 1))
        for prec in ("bf16-mixed", "32-true")}
    w_bf16 = runs["bf16-mixed"].states[0]["hidden.0.linear.weight"]
    w_fp32 = runs["32-true"].states[0]["hidden.0.linear.weight"]
    torch.testing.assert_close(w_bf16, pop.weights[0].detach()[0], rtol=0, atol=1e-6)
    assert 1e-6 < (w_bf16 - w_fp32).abs().max() < 2e-2
    # the history's loss is a float32 mean, near float32's
    h_bf16, h_fp32 = runs["bf16-mixed"].histories[0][0], runs["32-true"].histories[0][0]
    assert h_bf16["train_loss"] == pytest.approx(h_fp32["train_loss"], rel=2e-2)


class _CastCounter(TorchDispatchMode):
    """Counts float32 -> bfloat16 casts of tensors of each shape."""

    def __init__(self):
        super().__init__()
        self.casts: dict[tuple[int, ...], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                and kwargs.get("dtype") == torch.bfloat16):
            shape = tuple(args[0].shape)
            self.casts[shape] = self.casts.get(shape, 0) + 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_bf16_steps_cast_each_weight_once_per_step(tied):
    """Autocast would cast a weight at each of its uses (forward, backward: two or three per
    step); the fused steps cast it once (``training.population.compute_copy``)."""
    x, y = _data()
    dae = DAEPopulation([DenoisingAutoencoder(D, H, tied=tied, corruption_level=0.2,
                                              generator=torch.Generator().manual_seed(1))])
    classifier = ClassifierPopulation([_classifier()])
    weights = {(1, H, D), (1, D, H), (1, H, H), (1, C, H)}
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with _CastCounter() as counter:
            dae.sgd_step(x[:B].unsqueeze(0), [torch.Generator().manual_seed(3)], LR)
        assert {s: n for s, n in counter.casts.items() if s in weights} == (
            {(1, H, D): 1} if tied else {(1, H, D): 1, (1, D, H): 1})
        with _CastCounter() as counter:
            classifier.sgd_step(x[:B].unsqueeze(0), y[:B].unsqueeze(0), LR)
        assert {s: n for s, n in counter.casts.items() if s in weights} == {
            (1, H, D): 1, (1, H, H): 1, (1, C, H): 1}


def test_fused_bf16_classifier_step_equals_autograd_under_autocast():
    """One cast per step computes what autocast's cast at every use computes: the fused step
    against autograd and ``torch.optim.SGD`` in the same autocast region."""
    x, y = _data()
    xb, yb = x[:B], y[:B]
    pop = ClassifierPopulation([_classifier()]).train()
    reference = _classifier()
    sgd = torch.optim.SGD(reference.parameters(), lr=LR)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            pop.sgd_step(xb.unsqueeze(0), yb.unsqueeze(0), LR)
            loss = torch.nn.functional.cross_entropy(reference(xb).float(), yb)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    torch.testing.assert_close(pop.weights[1].detach()[0], reference.hidden[1].W.detach(),
                               rtol=0, atol=2e-3)
    torch.testing.assert_close(pop.out_weight.detach()[0], reference.output.weight.detach(),
                               rtol=0, atol=2e-3)

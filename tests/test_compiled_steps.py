"""Compiled steps (``at.compile``, ``PGD(compile=True)``) against the eager reference.

The compiled graphs are tiny (a two-layer CNN on 8x8 images) so that compilation takes seconds;
results are compared in float64, where the only differences inductor may introduce (fused,
reordered reductions) are ~1e-15, far from flipping the sign of a gradient entry.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from metarobust import compilation
from metarobust.attacks.pgd import PGD
from metarobust.errors import ConfigError

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double().eval()


@pytest.fixture
def dynamo_counters():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@needs_compiler
def test_compiled_pgd_gives_the_eager_adversarial_examples_on_the_same_noise(dynamo_counters):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=g)
    eager, compiled = PGD("linf", 8 / 255, 2 / 255, 5, compile=False), PGD("linf", 8 / 255, 2 / 255, 5, compile=True)
    noise = eager.init_noise(x, g)
    x_eager, x_compiled = eager(model, x, y, noise=noise), compiled(model, x, y, noise=noise)
    assert torch.allclose(x_eager, x_compiled, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(model(x_eager).argmax(1) == y, model(x_compiled).argmax(1) == y)  # robust accuracy
    assert not dynamo_counters["graph_break"], dict(dynamo_counters["graph_break"])

    # A new eps and step size reuse the compiled graphs (they are tensors there): no recompilation.
    frames = dynamo_counters["stats"]["unique_graphs"]
    other = PGD("linf", 4 / 255, 1 / 255, 5, compile=True)
    x_other = other(model, x, y, noise=noise)
    assert dynamo_counters["stats"]["unique_graphs"] == frames
    assert torch.allclose(x_other, PGD("linf", 4 / 255, 1 / 255, 5, compile=False)(model, x, y, noise=noise),
                          rtol=0, atol=1e-12)


@needs_compiler
def test_compiled_l2_pgd_with_per_sample_eps_equals_eager(dynamo_counters):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=g)
    eps = torch.linspace(0.1, 0.5, 8, dtype=torch.float64)
    attack = PGD("l2", 0.5, 0.1, 3, compile=False)
    noise = attack.init_noise(x, g)
    reference = attack(model, x, y, noise=noise, eps=eps)
    compiled = PGD("l2", 0.5, 0.1, 3, compile=True)(model, x, y, noise=noise, eps=eps)
    assert torch.allclose(reference, compiled, rtol=0, atol=1e-12)
    assert not dynamo_counters["graph_break"]


def test_eager_update_is_the_step_loop_of_before():
    """The factored-out update is PGD's old step body: sign step, ball, box."""
    from metarobust.attacks.pgd import pgd_update

    g = torch.Generator().manual_seed(2)
    x, delta, grad = (torch.rand(4, 3, 5, 5, generator=g) for _ in range(3))
    delta, grad = (delta - 0.5) * 0.1, grad - 0.5
    expected = ((x + (delta + 0.01 * grad.sign()).clamp(-0.03, 0.03)).clamp(0, 1) - x)
    assert torch.equal(pgd_update(delta, grad, x, 0.01, 0.03, "linf"), expected)


def test_compile_setting_accepts_auto_on_off_and_the_old_booleans():
    from metarobust.experiment import load_config

    plain = ["recipe=pgd_at"]
    assert load_config(None, plain).at.compile == "auto"
    assert load_config(None, [*plain, "at.compile=true"]).at.compile == "on"
    assert load_config(None, [*plain, "at.compile=false"]).at.compile == "off"
    assert load_config(None, [*plain, "at.compile=on"]).at.compile == "on"
    with pytest.raises(ConfigError, match="at.compile"):
        load_config(None, [*plain, "at.compile=sometimes"])
    with pytest.raises(ConfigError, match="at.compile=on with the meta recipe"):
        load_config(None, ["recipe=maml", "at.compile=on"])
    assert load_config(None, ["recipe=maml"]).at.compile == "auto"  # auto keeps meta recipes eager


def test_auto_compiles_only_what_the_measurement_table_says_pays_back(monkeypatch):
    row = compilation.Measurement(train_speedup=2.0, attack_speedup=1.8, compile_s=60.0, eager_step_s=2.0,
                                  source="test")
    monkeypatch.setitem(compilation.MEASURED, ("cpu", "family_x"), row)
    assert row.break_even_steps == 60.0
    assert compilation.decide("auto", "cpu", "family_x", steps=1000).on
    short = compilation.decide("auto", "cpu", "family_x", steps=10)
    assert not short.on and "60 steps" in short.reason
    unknown = compilation.decide("auto", "cpu", "no_such_family", steps=10 ** 6)
    assert not unknown.on and "not in the measurement table" in unknown.reason
    monkeypatch.setitem(compilation.MEASURED, ("cpu", "slow"), row.__class__(1.02, 1.0, 60.0, 2.0, "test"))
    assert not compilation.decide("auto", "cpu", "slow", steps=10 ** 6).on
    assert compilation.decide("on", "cpu", "no_such_family").on
    assert not compilation.decide("off", "cpu", "family_x", steps=10 ** 6).on


@needs_compiler
def test_compiled_training_step_follows_the_eager_one():
    """``at.compile=on`` trains what ``off`` trains: the same losses over two PGD-AT steps on the
    same batches and noise, to float32 round-off (an input-gradient entry near zero may flip the
    sign step of a pixel, so the comparison is to a tolerance, not bitwise)."""
    from metarobust.data.store import ImageStore
    from metarobust.experiment import load_config
    from metarobust.training.data import TrainingData
    from metarobust.training.engine import Trainer

    g = torch.Generator().manual_seed(0)
    store = ImageStore((torch.rand(32, 1, 16, 16, generator=g) * 255).to(torch.uint8), torch.arange(32) % 4,
                       [str(i) for i in range(4)])
    base = ["recipe=pgd_at", "data.dataset=mnist", "model.name=small_cnn", "model.hidden=4", "model.drop_rate=0", "at.batch_size=16",
            "at.epochs=1", "optim.schedule=constant", "optim.lr=0.05", "at.augment=none", "train_attack.name=pgd",
            "train_attack.eps=0.1", "train_attack.steps=2", "train_attack.step_size=0.05", "train.log_every=1"]
    losses = {}
    for setting in ("off", "on"):
        trainer = Trainer(load_config(None, [*base, f"at.compile={setting}"]), data=TrainingData(store, None, None),
                          progress=False)
        assert trainer.compile_decision.on == (setting == "on")
        losses[setting] = [float(trainer.train_step()[0]) for _ in range(2)]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4, abs=1e-5)

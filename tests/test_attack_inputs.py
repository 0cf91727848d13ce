"""The attacks' public entry refuses what it cannot attack (images outside [0, 1], NaN, negative or
mis-shaped budgets), warns about a model in train mode, reads norm names in any case, has
Madry's step size by default, and draws its random start from a seed or a generator."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import toy_classifier
from torch import nn

from metarobust.attacks import APGD, PGD, fgsm
from metarobust.attacks.threat import TrainModeWarning
from metarobust.errors import ConfigError, DataError
from metarobust.training.recipes.base import bn_mode


@pytest.fixture(scope="module")
def trained():
    model, x, y = toy_classifier(points_per_class=8, steps=50)
    return model, x, y


ATTACKS = [PGD("linf", 0.1, steps=2), APGD("linf", 0.1, steps=2), fgsm("linf", 0.1)]


@pytest.mark.parametrize("attack", ATTACKS, ids=["pgd", "apgd", "fgsm"])
def test_images_outside_the_unit_box_are_refused_with_the_fix(trained, attack):
    model, x, y = trained
    for bad in (x * 255, (x - 0.5) / 0.25):  # 0-255 pixels; normalised images
        with pytest.raises(DataError, match=r"expect images in \[0, 1\].*normalisation inside the model"):
            attack(model, bad, y, seed=0)


@pytest.mark.parametrize("attack", ATTACKS, ids=["pgd", "apgd", "fgsm"])
def test_nan_and_integer_images_are_refused(trained, attack):
    model, x, y = trained
    with_nan = x.clone()
    with_nan[3, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        attack(model, with_nan, y, seed=0)
    with pytest.raises(DataError, match="uint8"):
        attack(model, (x * 255).to(torch.uint8), y, seed=0)


def test_call_time_eps_and_step_size_must_be_non_negative_and_one_per_sample(trained):
    model, x, y = trained
    attack = PGD("linf", 0.1, steps=2)
    with pytest.raises(ConfigError, match="eps=-0.1"):
        attack(model, x, y, seed=0, eps=-0.1)
    per_sample = torch.full((len(x),), 0.1)
    per_sample[5] = -0.01
    with pytest.raises(ConfigError, match="eps has an entry -0.01"):
        attack(model, x, y, seed=0, eps=per_sample)
    with pytest.raises(ConfigError, match=rf"eps has shape \(3,\).*\[{len(x)}\]"):
        attack(model, x, y, seed=0, eps=torch.full((3,), 0.1))
    with pytest.raises(ConfigError, match="step_size has an entry"):
        attack(model, x, y, seed=0, step_size=-per_sample.abs())
    x_adv = attack(model, x, y, seed=0, eps=per_sample.clamp_min(0))  # a valid per-sample budget
    assert ((x_adv - x).flatten(1).abs().amax(1) <= per_sample.clamp_min(0) + 1e-6).all()


def test_unchecked_calls_skip_the_checks(trained):
    model, x, y = trained
    attack = PGD("linf", 0.1, steps=1)
    attack(model, x * 2, y, seed=0, check=False)  # no error: the caller vouches for its inputs


def test_a_batch_norm_model_in_train_mode_gets_a_warning_and_eval_mode_none(trained):
    _, x, y = trained
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    attack = PGD("linf", 0.1, steps=1)
    model.train()
    with pytest.warns(TrainModeWarning, match=r"BatchNorm1d.*model\.eval\(\)"):
        attack(model, x, y, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attack(model.eval(), x, y, seed=0)
        with bn_mode(model, "train"):  # a recipe attacking in train mode on purpose
            attack(model, x, y, seed=0)
    # APGD differentiates with torch.func, which cannot update running statistics at all
    with pytest.raises(ConfigError, match=r"BatchNorm1d.*model\.eval\(\)"):
        APGD("linf", 0.1, steps=1)(model.train(), x, y, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        APGD("linf", 0.1, steps=1)(model.eval(), x, y, seed=0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).train()  # nothing mode-dependent: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PGD("linf", 0.1, steps=1)(plain, x, y, seed=0)


def test_norm_names_are_case_insensitive():
    assert PGD("Linf", 0.1).norm == "linf" and PGD("L2", 0.5).norm == "l2" and PGD("L-inf", 0.1).norm == "linf"
    assert APGD("L1", 12.0).norm == "l1" and APGD("LINF", 0.1).norm == "linf"
    assert PGD("Linf", 0.1) == PGD("linf", 0.1)
    with pytest.raises(ConfigError, match="norm='L3'.*case-insensitive"):
        PGD("L3", 0.1)


def test_default_step_size_is_madrys_two_and_a_half_eps_over_steps():
    assert PGD("linf", 8 / 255).steps == 10
    assert PGD("linf", 8 / 255).step_size == pytest.approx(2 / 255)
    assert PGD("l2", 0.5, steps=20).step_size == pytest.approx(2.5 * 0.5 / 20)
    assert PGD("l1", 12.0).step_size == pytest.approx(3.0)
    assert PGD("linf", 0.1, 0.05, 3).step_size == 0.05  # an explicit step is kept
    eps = torch.tensor([0.1, 0.2])
    torch.testing.assert_close(PGD("linf", eps, steps=5).step_size, eps / 2)


def test_the_same_seed_gives_the_same_adversarial_examples(trained):
    model, x, y = trained
    for attack in (PGD("l2", 1.0, steps=3, restarts=2), APGD("linf", 0.1, steps=3, restarts=2)):
        first = attack(model, x, y, seed=3)
        assert torch.equal(first, attack(model, x, y, seed=3))
        assert not torch.equal(first, attack(model, x, y, seed=4))
        by_generator = attack(model, x, y, generator=torch.Generator().manual_seed(3))
        by_noise = attack(model, x, y, noise=attack.init_noise(x, torch.Generator().manual_seed(3)))
        assert torch.equal(first, by_generator) and torch.equal(first, by_noise)
        with pytest.raises(ValueError, match="seed="):
            attack(model, x, y)
        with pytest.raises(ValueError, match="not both"):
            attack(model, x, y, noise=attack.init_noise(x), seed=0)


def test_training_attacks_skip_the_checks_and_their_host_sync(trained, monkeypatch):
    from types import SimpleNamespace

    from metarobust.attacks import threat
    from metarobust.training.recipes.base import Recipe

    model, x, y = trained
    calls = []
    monkeypatch.setattr(threat, "check_call", lambda *a, **k: calls.append(a))
    attack = PGD("linf", 0.1, steps=1)
    Recipe.attack(SimpleNamespace(bn="train"), model, attack, x, y, noise=attack.init_noise(x))
    assert calls == []  # the engine's batches are in [0, 1]: no check, no sync per step
    attack(model, x, y, seed=0)
    assert len(calls) == 1  # a direct call is checked once

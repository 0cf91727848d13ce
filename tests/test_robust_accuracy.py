"""``metarobust.robust_accuracy``: one call for a user's own model, through the harness's cascade,
in eval mode (the model's mode and BatchNorm statistics left as they were), batched, seeded."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_classifier
from torch import nn

import metarobust
from metarobust.attacks import fgsm
from metarobust.config import AttackConfig, EvalConfig, ExperimentConfig
from metarobust.errors import ConfigError, DataError
from metarobust.evaluation import RobustAccuracy, robust_accuracy
from metarobust.evaluation.harness import suite_configs


@pytest.fixture(scope="module")
def trained():
    return toy_classifier(points_per_class=12, steps=100)


def test_fgsm_suite_equals_the_attack_by_hand_whatever_the_batch_size(trained):
    model, x, y = trained
    eps = 0.15
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        x_fgsm = fgsm("linf", eps)(model, x, y)
        robust_ok = clean_ok & (model(x_fgsm).argmax(1) == y)
    n = len(y)
    for batch_size in (7, 1000):
        r = robust_accuracy(model, x, y, eps=eps, suite="fgsm", batch_size=batch_size, return_adversarial=True)
        assert isinstance(r, RobustAccuracy)
        assert r.clean_acc == pytest.approx(float(clean_ok.float().mean()))
        # a sign flip of a float32 gradient coordinate at a tie may move one point
        assert abs(r.robust_acc - float(robust_ok.float().mean())) <= 1 / n + 1e-9
        assert list(r.after) == ["linf/fgsm-1"] and r.after["linf/fgsm-1"] == r.robust_acc
        assert r.x_adv.shape == x.shape
        broken = clean_ok & (model(r.x_adv).argmax(1) != y)
        assert r.robust_acc == pytest.approx(float((clean_ok & ~broken).float().mean()))
        unbroken = ~broken
        assert torch.equal(r.x_adv[unbroken], x[unbroken])  # AutoAttack's convention: clean where none broke it
        assert (r.x_adv - x).abs().max() <= eps + 1e-6


def test_the_model_is_attacked_in_eval_mode_and_its_mode_restored(trained):
    _, x, y = trained
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model(x)  # running statistics that an attack in train mode would overwrite
    model.train()
    before = model[2].running_mean.clone(), model[2].num_batches_tracked.clone()
    r = robust_accuracy(model, x, y, eps=0.1, suite="pgd", steps=3)
    assert model.training
    assert torch.equal(model[2].running_mean, before[0]) and torch.equal(model[2].num_batches_tracked, before[1])
    with torch.no_grad():
        assert r.clean_acc == pytest.approx(float((model.eval()(x).argmax(1) == y).float().mean()))


def test_the_same_seed_gives_the_same_numbers_and_norm_names_are_case_insensitive(trained):
    model, x, y = trained
    a = robust_accuracy(model, x, y, eps=1.0, norm="L2", suite="pgd", steps=5, seed=1, return_adversarial=True)
    b = robust_accuracy(model, x, y, eps=1.0, norm="l2", suite="pgd", steps=5, seed=1, return_adversarial=True)
    assert a.robust_acc == b.robust_acc and torch.equal(a.x_adv, b.x_adv)
    assert a.result.norm == "l2" and list(a.after) == ["l2/pgd-5"]
    assert a.robust_acc <= a.clean_acc


def test_a_suite_is_run_by_name_as_the_harness_defines_it(trained):
    model, x, y = trained
    x, y = x[:16], y[:16]
    # apgd_ce_t: a suite of two white-box attacks keeps this quick (autoattack adds Square's 5000
    # queries per robust point; tests/test_autoattack.py runs it)
    r = robust_accuracy(model, x, y, eps=0.1, suite="apgd_ce_t")
    cfg = ExperimentConfig(attack=AttackConfig(eps=0.1), eval=EvalConfig(suite="apgd_ce_t"))
    assert list(r.after) == [name for name, _ in suite_configs(cfg, 4)]  # whatever the suite holds
    assert r.robust_acc == list(r.after.values())[-1] <= r.clean_acc
    assert metarobust.robust_accuracy is robust_accuracy


def test_inputs_it_cannot_attack_are_refused_before_any_work(trained):
    model, x, y = trained
    with pytest.raises(DataError, match=r"\[0, 1\].*normalisation inside the model"):
        robust_accuracy(model, x * 255, y, eps=8 / 255)
    with pytest.raises(DataError, match="labels in"):
        robust_accuracy(model, x, y + 4, eps=0.1, suite="fgsm")
    with pytest.raises(DataError, match="one per image"):
        robust_accuracy(model, x, y[:-1], eps=0.1)
    with pytest.raises(ConfigError, match="suite='pgd-10'.*autoattack.*apgd"):
        robust_accuracy(model, x, y, eps=0.1, suite="pgd-10")
    with pytest.raises(ConfigError, match="eps=-0.1"):
        robust_accuracy(model, x, y, eps=-0.1)
    with pytest.raises(ConfigError, match="norm='l3'"):
        robust_accuracy(model, x, y, eps=0.1, norm="l3")
    pixels = (x * 255).round().to(torch.uint8)  # uint8 images are read as 0..255
    r = robust_accuracy(model, pixels, y, eps=0.1, suite="fgsm")
    assert r.clean_acc == pytest.approx(float((model(pixels.float() / 255).argmax(1) == y).float().mean()))


def test_a_batch_coupled_model_is_attacked_whole_and_its_adversarial_examples_returned(trained):
    _, x, y = trained
    torch.manual_seed(0)
    from metarobust.meta import convert_batch_norm  # transductive BN: a point depends on its batch

    model = convert_batch_norm(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Flatten(), nn.Linear(8 * 8 * 8, 4)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    r = robust_accuracy(model, x, y, eps=0.3, suite="pgd", steps=5, return_adversarial=True)
    assert r.robust_acc < r.clean_acc  # something to break
    changed = (r.x_adv != x).flatten(1).any(1)
    assert changed.float().mean() >= r.clean_acc - r.robust_acc - 1e-6  # every broken point has its input
    assert (r.x_adv - x).abs().max() <= 0.3 + 1e-6 and 0 <= r.x_adv.min() and r.x_adv.max() <= 1

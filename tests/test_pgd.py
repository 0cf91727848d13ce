"""PGD: stays in the eps-ball and the image box, raises the loss, and robust accuracy falls
monotonically with eps; the same function works on a functional model under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_classifier
from numerics import float64_copy

from metarobust.attacks import PGD, build_attack
from metarobust.config import AttackConfig
from metarobust.meta.functional import functional_forward, params_of


@pytest.fixture(scope="module")
def trained():
    return toy_classifier(points_per_class=64)


def robust_accuracy(model, x, y, eps, steps=10, seed=0):
    attack = PGD("linf", eps, max(eps / 4, 1e-6), steps)
    x_adv = attack(model, x, y, noise=attack.init_noise(x, torch.Generator().manual_seed(seed)))
    return (model(x_adv).argmax(1) == y).float().mean().item(), x_adv


def test_clean_model_is_accurate(trained):
    model, x, y = trained
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_adversarial_examples_stay_in_the_eps_ball_and_in_unit_box(trained):
    model, x, y = trained
    for eps in (2 / 255, 8 / 255, 0.3):
        _, x_adv = robust_accuracy(model, x, y, eps)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_raises_the_loss_more_than_random_noise(trained):
    model, x, y = trained
    eps = 16 / 255
    _, x_adv = robust_accuracy(model, x, y, eps)
    noisy = (x + eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    clean, rand, adv = (F.cross_entropy(model(v), y).item() for v in (x, noisy, x_adv))
    assert adv > 2 * clean and adv > rand


def test_robust_accuracy_falls_as_eps_grows_and_reaches_zero(trained):
    model, x, y = trained
    accs = [robust_accuracy(model, x, y, eps)[0] for eps in (0.0, 0.05, 0.1, 0.2, 0.5)]
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[0] > 0.95 and accs[-1] < 0.05


def test_more_steps_never_help_the_model(trained):
    model, x, y = trained
    few = robust_accuracy(model, x, y, 0.08, steps=2)[0]
    many = robust_accuracy(model, x, y, 0.08, steps=20)[0]
    assert many <= few


def test_random_start_requires_noise_and_fgsm_needs_none(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="init_noise"):
        PGD("linf", 0.1, 0.1, 1)(model, x, y)
    fgsm = build_attack(AttackConfig(name="fgsm", eps=0.1))
    assert fgsm.init_noise(x) is None
    step = (fgsm(model, x, y) - x).abs()
    clipped = ((x + 0.1) > 1) | ((x - 0.1) < 0)
    assert torch.allclose(step[~clipped], torch.tensor(0.1), atol=1e-6)  # one full signed step


def test_negative_eps_is_rejected():
    with pytest.raises(ValueError, match="eps"):
        PGD("linf", -0.1, 0.01, 10)


def test_attack_on_functional_model_under_vmap_equals_per_task_loop(trained):
    model, x, y = trained
    # float64: the two kernels' round-off flips a gradient sign only at a tie within ~1e-14 (in
    # float32, ~1e-7, it happens); L-inf steps are then elementwise: equal to the bit (numerics.py)
    model = float64_copy(model)
    forward = functional_forward(model)
    params = {k: v.detach() for k, v in params_of(model).items()}
    xs, ys = x[:60].double().view(3, 20, 1, 8, 8), y[:60].view(3, 20)
    attack = PGD("linf", 0.1, 0.02, 5)
    noise = attack.init_noise(xs, torch.Generator().manual_seed(0))

    def one(p, xi, yi, ni):
        return attack(lambda v: forward(p, v), xi, yi, noise=ni)

    batched = torch.func.vmap(one, in_dims=(None, 0, 0, 0))(params, xs, ys, noise)
    looped = torch.stack([one(params, xs[t], ys[t], noise[t]) for t in range(3)])
    assert torch.equal(batched, looped)

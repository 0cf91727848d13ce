"""MCG: the c-Glow generator, its two training stages, MI-FGSM, and the attack-time proposal."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_classifier

from metarobust.attacks import mi_fgsm
from metarobust.attacks.threat import in_threat_model
from metarobust.blackbox.mcg import (
    CGlow,
    GeneratorConfig,
    MCGConfig,
    MCGGenerator,
    interpolate_,
    pretrain,
    reptile_task,
    transfer_pairs,
)
from metarobust.blackbox.mcg.training import snapshot, surrogate_margin

TINY = {"levels": 2, "steps": 2, "hidden": 8, "x_hidden_channels": 4, "x_hidden_size": 8}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scrambled(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """``module`` with every weight moved at random: a fresh flow is a permutation (its heads
    start at zero), which would make the log-det tests trivial."""
    g = seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def toy():
    model, x, y = toy_classifier()
    x, y = torch.round(x[:16] * 255) / 255, y[:16]
    keep = model(x).argmax(-1) == y
    return model, x[keep], y[keep]


def test_the_flow_inverts_its_forward_within_float32_round_off():
    torch.manual_seed(0)
    flow = scrambled(CGlow((3, 8, 8), 3, levels=3, steps=2, hidden=8, x_hidden_channels=4, x_hidden_size=8))
    u, x = torch.randn(2, 3, 8, 8, generator=seeded(1)), torch.rand(2, 3, 8, 8, generator=seeded(2))
    zs, _ = flow(u, x)
    assert [tuple(z.shape[1:]) for z in zs] == flow.latent_shapes == [(6, 4, 4), (12, 2, 2), (48, 1, 1)]
    assert torch.allclose(flow.inverse(zs, x), u, rtol=0, atol=1e-4)
    assert torch.allclose(flow(flow.inverse(zs, x), x)[0][-1], zs[-1], rtol=0, atol=1e-4)


def test_the_log_determinant_equals_the_brute_force_jacobian():
    torch.manual_seed(0)
    flow = scrambled(CGlow((1, 4, 4), 1, **TINY))
    u, x = torch.randn(1, 1, 4, 4, generator=seeded(1)), torch.rand(1, 1, 4, 4, generator=seeded(2))
    logdet = flow(u, x)[1].detach()
    exact = flow.double()  # the reference: the Jacobian of the same map in float64

    def latents(v):
        return torch.cat([z.flatten() for z in exact(v.view(1, 1, 4, 4), x.double())[0]])

    jac = torch.autograd.functional.jacobian(latents, u.double().flatten())
    sign, reference = torch.linalg.slogdet(jac)
    assert sign != 0
    # float32: each of the d = 16 dimensions' log-scales is summed with relative error ~eps32
    # per operation through 2 levels x 2 steps x 3 layers; allow 100 eps32 per dimension.
    tol = 100 * u.numel() * torch.finfo(torch.float32).eps * (1 + abs(float(reference)))
    assert abs(float(logdet) - float(reference)) < tol
    assert abs(float(exact(u.double(), x.double())[1]) - float(reference)) < 1e-9


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("bound", ["tanh", "clamp"])
@pytest.mark.parametrize("subspace", [None, 4])
def test_samples_respect_the_eps_ball_and_the_box(norm, eps, bound, subspace):
    torch.manual_seed(0)
    g = scrambled(MCGGenerator(GeneratorConfig((1, 8, 8), norm, eps, bound, subspace=subspace, **TINY)))
    x = torch.rand(6, 1, 8, 8, generator=seeded(1))
    x[:, :, :2] = 0.0  # pixels at the box's edges
    x[:, :, -2:] = 1.0
    delta = g.sample(x, seeded(2), temperature=3.0)
    assert delta.shape == x.shape
    assert bool(in_threat_model(x, x + delta, norm, eps).all())
    assert float(delta.abs().max()) > 0.2 * eps / (1 if norm == "linf" else 8)  # not trivially zero


def test_encode_inverts_decode_inside_the_bound():
    torch.manual_seed(0)
    g = scrambled(MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.1, **TINY)), scale=0.1)
    x = 0.25 + 0.5 * torch.rand(3, 1, 8, 8, generator=seeded(1))  # eps 0.1 never reaches the box
    z = g.sample_latents(x, seeded(2), temperature=0.3)
    delta = g.decode(z, x)
    assert torch.allclose(g.decode(g.encode(x, delta), x), delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_mi_fgsm_stays_in_the_ball_and_raises_the_loss(toy, norm, eps):
    model, x, y = toy
    x_adv = mi_fgsm(model, x, y, norm, eps, steps=5)
    assert bool(in_threat_model(x, x_adv, norm, eps).all())
    ce = torch.nn.functional.cross_entropy
    assert float(ce(model(x_adv), y)) > float(ce(model(x), y))


def test_transfer_pairs_keep_the_confidently_correct_images(toy):
    model, x, y = toy
    cfg = MCGConfig(transfer_steps=3, confidence=(0.9, 1.0))
    xs, deltas, kept = transfer_pairs(model, x, y, "linf", 0.1, cfg)
    p = model(x).softmax(-1).gather(1, y.view(-1, 1)).squeeze(1)
    assert torch.equal(kept, p > 0.9) and len(xs) == int(kept.sum())
    assert float(deltas.abs().max()) <= 0.1 + 1e-6


def test_pretraining_lowers_the_nll_of_the_transfer_perturbations():
    torch.manual_seed(0)
    g = MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.1, **TINY))
    x = torch.rand(32, 1, 8, 8, generator=seeded(1))
    delta = 0.1 * torch.tanh(3 * (x - 0.5))  # a perturbation that depends on the image
    cfg = MCGConfig(pretrain_batch=16, pretrain_lr=1e-2)
    with torch.no_grad():
        before = float(g.nll(x, delta).mean())
    losses = pretrain(g, x, delta, cfg, seeded(2), epochs=8)
    with torch.no_grad():
        after = float(g.nll(x, delta).mean())
    assert len(losses) == 8 and after < before - 0.2, (before, after)


def test_the_reptile_outer_step_moves_the_weights_exactly_by_the_interpolation(toy):
    model, x, y = toy
    torch.manual_seed(0)
    g = MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.1, **TINY))
    cfg = MCGConfig(inner_steps=2, inner_lr=1e-2, outer_lr=0.3, outer_lr_scaled=False)
    start = snapshot(g)
    task = reptile_task(g, [model], x[:4], y[:4], cfg, seeded(1))
    after = snapshot(g)
    assert any(not torch.equal(t, s) for t, s in zip(task, start))  # the inner loop moved
    for s, t, a in zip(start, task, after):
        assert torch.equal(a, s + 0.3 * (t - s))
    assert MCGConfig(meta_batch=16, inner_steps=5, outer_lr=0.01).outer_step == pytest.approx(0.01 * 2 / 80)


def test_interpolation_with_weight_zero_restores_and_one_keeps():
    g = MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.1, **TINY))
    start = snapshot(g)
    scrambled(g)
    moved = snapshot(g)
    interpolate_(g, start, 1.0)
    assert all(torch.equal(p, m) for p, m in zip(g.parameters(), moved))
    interpolate_(g, start, 0.0)
    assert all(torch.equal(p, s) for p, s in zip(g.parameters(), start))


def test_meta_training_lowers_the_surrogate_margin(toy):
    from metarobust.blackbox.mcg import meta_train

    model, x, y = toy
    torch.manual_seed(0)
    g = MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.2, **TINY))
    cfg = MCGConfig(meta_batch=8, inner_steps=3, inner_lr=2e-2, outer_lr=1.0, outer_lr_scaled=False)
    margins = meta_train(g, [model], x, y, cfg, seeded(1), epochs=3)
    with torch.no_grad():
        final = float(surrogate_margin([model], x, y, g.sample(x, seeded(2)), cfg.kappa).mean())
    assert final < margins[0], (margins, final)

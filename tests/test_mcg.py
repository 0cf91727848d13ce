"""MCG: the c-Glow generator, its two training stages, MI-FGSM, and the attack-time proposal."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import toy_classifier

from metarobust.attacks import mi_fgsm
from metarobust.attacks.threat import in_threat_model
from metarobust.blackbox import Oracle
from metarobust.blackbox.mcg import (
    CGlow,
    GeneratorConfig,
    History,
    MCGAttack,
    MCGConfig,
    MCGGenerator,
    interpolate_,
    mcg_propose,
    meta_train,
    pretrain,
    reptile_task,
    transfer_pairs,
)
from metarobust.blackbox.mcg.training import snapshot, surrogate_margin
from metarobust.errors import ConfigError

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
    assert abs(float(exact(u.double(), x.double())[1].detach()) - float(reference)) < 1e-9


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("bound", ["tanh", "clamp"])
@pytest.mark.parametrize("subspace", [None, 4])
def test_samples_respect_the_eps_ball_and_the_box(norm, eps, bound, subspace):
    torch.manual_seed(0)
    g = scrambled(MCGGenerator(GeneratorConfig((1, 8, 8), norm, eps, bound, subspace=subspace, **TINY)))
    x = torch.rand(6, 1, 8, 8, generator=seeded(1))
    x[:, :, :2] = 0.0  # pixels at the box's edges
    x[:, :, -2:] = 1.0
    with torch.no_grad():
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
    with torch.no_grad():
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
    model, x, y = toy
    torch.manual_seed(0)
    g = MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.2, **TINY))
    cfg = MCGConfig(meta_batch=8, inner_steps=3, inner_lr=2e-2, outer_lr=1.0, outer_lr_scaled=False)
    margins = meta_train(g, [model], x, y, cfg, seeded(1), epochs=3)
    with torch.no_grad():
        final = float(surrogate_margin([model], x, y, g.sample(x, seeded(2)), cfg.kappa).mean())
    assert final < margins[0], (margins, final)


def proposal_setup(toy, budget=5, **cfg):
    model, x, y = toy
    torch.manual_seed(0)
    g = scrambled(MCGGenerator(GeneratorConfig((1, 8, 8), "linf", 0.1, **TINY)))
    surrogate = scrambled(copy.deepcopy(model), seed=3)  # a surrogate close to the target, not equal
    oracle = Oracle(model, budget=budget, examples=len(x), output="probs", levels=256)
    return g, surrogate, oracle, x, y, MCGConfig(**cfg)


@pytest.mark.parametrize("per_example", [True, False])
def test_the_proposal_charges_one_query_per_example_and_resets_the_generator(toy, per_example):
    g, surrogate, oracle, x, y, cfg = proposal_setup(toy, finetune_latent=True, latent_steps=2,
                                                     per_example=per_example)
    phi_0 = snapshot(g)
    p = mcg_propose(g, oracle, x, y, surrogate, cfg, seeded(1))
    assert oracle.queries.tolist() == [1] * len(x) and p.queries.tolist() == [1] * len(x)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(g), phi_0))  # finetune_reload
    assert bool(in_threat_model(x, p.x_adv, "linf", 0.1).all())
    assert torch.allclose(p.x_adv * 255, torch.round(p.x_adv * 255), rtol=0, atol=1e-3)  # on the 8-bit grid
    assert torch.allclose(p.delta, p.x_adv - x) and float(p.delta.abs().max()) > 0
    assert torch.equal(p.success, oracle.verify(p.x_adv, y))
    assert torch.allclose(p.scores.sum(-1), torch.ones(len(x)))


def test_without_reload_the_fine_tuned_weights_carry_over(toy):
    g, surrogate, oracle, x, y, cfg = proposal_setup(toy, finetune_reload=False)
    phi_0 = snapshot(g)
    mcg_propose(g, oracle, x, y, surrogate, cfg, seeded(1))
    assert any(not torch.equal(a, b) for a, b in zip(snapshot(g), phi_0))


def test_an_example_without_budget_is_not_queried(toy):
    g, surrogate, _, x, y, cfg = proposal_setup(toy)
    budget = torch.ones(len(x), dtype=torch.long)
    budget[0] = 0
    oracle = Oracle(toy[0], budget=budget, output="probs", levels=256)
    p = mcg_propose(g, oracle, x, y, surrogate, cfg, seeded(1))
    assert oracle.queries.tolist() == [0] + [1] * (len(x) - 1)
    assert not bool(p.success[0]) and float(p.delta[0].abs().max()) == 0


def test_the_surrogate_is_refreshed_from_paid_answers_only_when_switched_on(toy):
    model, x, y = toy
    target = snapshot(model)
    for switch, moves in [(True, True), (False, False)]:
        g, surrogate, oracle, _, _, cfg = proposal_setup(toy, finetune_clean=switch, finetune_perturbation=False)
        history = History()
        with torch.no_grad():
            history.add(x, y, model(x).softmax(-1), "probs", kind="clean")  # answers the runner paid for
        before = snapshot(surrogate)
        mcg_propose(g, oracle, x, y, surrogate, cfg, seeded(1), history)
        moved = any(not torch.equal(a, b) for a, b in zip(snapshot(surrogate), before))
        assert moved == moves
        assert history.size("attack") == len(x)  # each proposal's paid answer is kept
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), target))  # the target is untouched


def test_the_attack_form_returns_an_outcome_and_checks_the_threat_model(toy):
    g, surrogate, oracle, x, y, cfg = proposal_setup(toy)
    outcome = MCGAttack("linf", 0.1, g, [surrogate], cfg)(oracle, x, y, seeded(1))
    assert outcome.queries.tolist() == [1] * len(x)
    with pytest.raises(ConfigError, match="generator's"):
        MCGAttack("linf", 0.2, g, [surrogate], cfg)


def test_the_dct_subspace_round_trips_its_low_frequency_block():
    g = MCGGenerator(GeneratorConfig((3, 16, 16), "linf", 0.1, subspace=8, **TINY))
    u = torch.randn(2, 3, 8, 8, generator=seeded(1))
    w = g.to_pixels(u)
    assert w.shape == (2, 3, 16, 16)
    assert torch.allclose(g.to_flow(w), u, rtol=0, atol=1e-5)
    assert torch.allclose(w.norm(), u.norm(), rtol=1e-5)  # orthonormal: energy kept


def test_the_lifelong_term_joins_once_the_history_is_large_and_lambda_adapts_after_warmup(toy):
    from metarobust.blackbox.mcg import SurrogateRefresh

    model, x, y = toy
    surrogate = scrambled(copy.deepcopy(model), seed=3)
    cfg = MCGConfig(surrogate_batch=2, lifelong_warmup=2, surrogate_loss="kl")
    refresh, history = SurrogateRefresh(surrogate, cfg), History()
    with torch.no_grad():
        history.add(x[:4], y[:4], model(x[:4]), "logits", kind="clean")
        history.add(x[4:6], y[4:6], model(x[4:6]), "logits", kind="attack")
    assert refresh.step(history, seeded(1)) and refresh.lam == 3.0  # 2 past attacks: not yet lifelong
    with torch.no_grad():
        history.add(x[6:9], y[6:9], model(x[6:9]), "logits", kind="attack")
    refresh.step(history, seeded(1))
    assert refresh.lam == 3.0 and refresh.updates == 2  # lifelong now; lambda waits for 2 updates
    refresh.step(history, seeded(1))
    assert refresh.lam != 3.0


def test_large_weights_still_decode_finite_perturbations_with_finite_gradients():
    torch.manual_seed(0)
    g = scrambled(MCGGenerator(GeneratorConfig((3, 8, 8), "linf", 0.1, levels=3, steps=2, hidden=8,
                                               x_hidden_channels=4, x_hidden_size=8)), scale=0.3)
    x = torch.rand(2, 3, 8, 8, generator=seeded(1))
    delta = g.sample(x, seeded(2))
    delta.sum().backward()
    assert bool(torch.isfinite(delta).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in g.parameters() if p.grad is not None)

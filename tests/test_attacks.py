"""Specifications of the white-box attacks we report numbers with (PGD, FGSM, FGSM-RS in L-inf,
L2 and L1) and of their threat models, after the AutoAttack protocol and the checklist of
Carlini et al., "On Evaluating Adversarial Robustness" (2019):

- every adversarial example lies in its norm's eps-ball (per-sample eps too) and in [0, 1];
- the L1 projection is exact (against a bisection reference);
- the attack raises the loss, more than random noise of the same size;
- targeted PGD reaches the target far more often than chance;
- more steps or restarts never raise robust accuracy; a large eps drives it to ~0;
- attacking an eval-mode model leaves its BatchNorm running statistics alone;
- vmap over tasks equals the per-task loop;
- robust accuracy agrees with torchattacks' PGD / PGDL2 / FFGSM within 3 points on the same
  trained model and inputs, and FGSM equals torchattacks.FGSM bit for bit.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import float64_copy, vmap_attack_atol
from torch import nn

from metarobust.attacks import ATTACKS, build_attack, cross_entropy_sum, kl_from_clean, threat
from metarobust.attacks.pgd import PGD, fgsm, fgsm_rs
from metarobust.config import AttackConfig
from metarobust.meta.functional import functional_forward, params_of

CLASSES = 5
SHAPE = (3, 8, 8)
DIM = 3 * 8 * 8
# Budgets at which the model below is neither robust nor broken (robust accuracy ~0.5-0.8).
EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 4.0}
NORMS = tuple(EPS)
# Largest gap allowed between our robust accuracy and torchattacks' on 500 points.
TORCHATTACKS_TOLERANCE = 0.03


def pgd(norm, steps=10, **kw):
    eps = kw.pop("eps", EPS[norm])
    radius = eps if isinstance(eps, float) else EPS[norm]
    return PGD(norm, eps, kw.pop("step_size", 2.5 * radius / steps), steps, **kw)


def run(attack, forward, x, y, seed=0, **kw):
    return attack(forward, x, y, noise=attack.init_noise(x, torch.Generator().manual_seed(seed)), **kw)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def norms_of(delta, norm):
    flat = delta.flatten(1).double()
    return torch.linalg.vector_norm(flat, ord={"linf": math.inf, "l2": 2, "l1": 1}[norm], dim=1)


@pytest.fixture(scope="module")
def trained():
    """A small classifier (5 classes, 3x8x8 inputs), accurate on clean data but not robust."""
    g = torch.Generator().manual_seed(0)
    prototypes = 0.5 + 0.3 * (torch.rand(CLASSES, *SHAPE, generator=g) - 0.5)

    def draw(n, seed):
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(CLASSES).repeat(n // CLASSES)
        return (prototypes[y] + 0.3 * torch.randn(len(y), *SHAPE, generator=gen)).clamp(0, 1), y

    x, y = draw(500, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x_test, y_test = draw(500, 2)
    assert accuracy(model, x_test, y_test) > 0.9
    return model, x_test, y_test


@pytest.fixture(scope="module")
def bn_model():
    """A conv net with nn.BatchNorm2d whose running statistics are not the defaults, in eval mode."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, CLASSES))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, *SHAPE))
    return model.eval()


# -- threat models ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("per_sample_eps", [False, True])
def test_adversarial_examples_lie_in_the_eps_ball_and_the_unit_box(trained, norm, per_sample_eps):
    model, x, y = trained
    eps = EPS[norm]
    if per_sample_eps:
        eps = EPS[norm] * 2 * torch.rand(len(x), generator=torch.Generator().manual_seed(3))
        eps[:10] = 0.0
    for attack in (pgd(norm, eps=eps, restarts=2), pgd(norm, eps=eps, random_start=False),
                   fgsm(norm, eps), fgsm_rs(norm, eps)):
        x_adv = run(attack, model, x, y)
        limit = torch.as_tensor(eps, dtype=torch.float64)
        assert (norms_of(x_adv - x, norm) <= limit * (1 + 1e-5) + 1e-6).all(), attack
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert threat.in_threat_model(x, x_adv, norm, eps).all()
        if per_sample_eps:
            assert torch.equal(x_adv[:10], x[:10])  # eps = 0: untouched
    # A per-sample eps may also be given per call (e.g. per-sample budgets in training).
    x_adv = run(pgd(norm), model, x, y, eps=torch.full((len(x),), EPS[norm] / 2))
    assert (norms_of(x_adv - x, norm) <= EPS[norm] / 2 * (1 + 1e-5) + 1e-6).all()


def _l1_projection_by_bisection(v: torch.Tensor, eps: float) -> torch.Tensor:
    """The slow reference: find theta with sum(max(|v| - theta, 0)) = eps by bisection (float64)."""
    if v.abs().sum() <= eps:
        return v.clone()
    lo, hi = 0.0, v.abs().max().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        if (v.abs() - mid).clamp_min(0).sum() > eps:
            lo = mid
        else:
            hi = mid
    return v.sign() * (v.abs() - hi).clamp_min(0)


def test_l1_projection_is_exact():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(12, 1, 1, 1, generator=g, dtype=torch.float64)
    v = torch.randn(12, 3, 5, 5, generator=g, dtype=torch.float64) * scale
    v[3] = 0.0
    v[4, 0, 0, 0] = 10.0  # one dominant coordinate
    l1 = v.flatten(1).abs().sum(1)
    eps = torch.stack([l1 / 3, l1 * 2, l1, torch.full_like(l1, 0.7), torch.zeros_like(l1)])
    for e in eps:
        projected = threat.project_l1_ball(v, e.view(-1, 1, 1, 1))
        reference = torch.stack([_l1_projection_by_bisection(v[i], e[i].item()) for i in range(len(v))])
        torch.testing.assert_close(projected, reference, atol=1e-10, rtol=0)
        assert (projected.flatten(1).abs().sum(1) <= e * (1 + 1e-12) + 1e-12).all()
    # A float radius, float32, and idempotence.
    v32 = v.float()
    once = threat.project_l1_ball(v32, 0.5)
    torch.testing.assert_close(threat.project_l1_ball(once, 0.5), once)
    assert (once.flatten(1).abs().sum(1) <= 0.5 * (1 + 1e-5)).all()


def test_l2_and_linf_projections_and_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, *SHAPE, generator=g)
    delta = torch.randn(64, *SHAPE, generator=g)
    for norm, eps in (("linf", 0.1), ("l2", 1.0), ("l1", 5.0)):
        d = threat.project(delta, x, norm, eps)
        assert (norms_of(d, norm) <= eps * (1 + 1e-5)).all()
        assert ((x + d) >= 0).all() and ((x + d) <= 1).all()
        small = 1e-3 * delta  # inside every ball: only the box can change it
        torch.testing.assert_close(threat.project_ball(small, norm, eps), small)


def test_step_directions_have_unit_norm_and_l1_steps_are_sparse_and_respect_the_box():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(8, *SHAPE, generator=g)
    assert torch.equal(threat.step_direction(grad, "linf"), grad.sign())
    torch.testing.assert_close(norms_of(threat.step_direction(grad, "l2"), "l2").float(), torch.ones(8))
    x_adv = torch.rand(8, *SHAPE, generator=g)
    x_adv[grad > 1.0] = 1.0  # these coordinates cannot increase
    e = threat.step_direction(grad, "l1", x_adv, l1_quantile=0.9)
    torch.testing.assert_close(norms_of(e, "l1").float(), torch.ones(8))
    nonzero = (e != 0).flatten(1).sum(1)
    assert (nonzero == round(0.1 * DIM)).all()
    assert (e[grad > 1.0] == 0).all()  # blocked by the box
    assert torch.equal(e.sign()[e != 0], grad.sign()[e != 0])
    # The default SLIDE quantile (99th percentile) moves the top 1 % (at least one coordinate).
    assert ((threat.step_direction(grad, "l1") != 0).flatten(1).sum(1) == 2).all()
    assert (threat.step_direction(torch.zeros_like(grad), "l1") == 0).all()


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_is_inside_the_ball_with_uniform_radius(norm):
    x = torch.full((4000, *SHAPE), 0.5)  # no box clipping at these radii
    eps = {"linf": 0.1, "l2": 0.4, "l1": 4.0}[norm]
    noise = threat.draw_noise(x, norm, torch.Generator().manual_seed(0))
    delta = threat.random_start(x, noise, norm, eps)
    r = norms_of(delta, norm) / eps
    assert (r <= 1 + 1e-5).all()
    if norm == "linf":
        assert delta.abs().mean().item() == pytest.approx(eps / 2, rel=0.02)  # uniform in the cube
    else:  # radius ~ U(0, 1), direction spread over all coordinates
        quartiles = torch.quantile(r.float(), torch.tensor([0.25, 0.5, 0.75]))
        torch.testing.assert_close(quartiles, torch.tensor([0.25, 0.5, 0.75]), atol=0.03, rtol=0)
        assert (delta != 0).float().mean() > 0.99


# -- attack strength ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_attacks_raise_the_loss_above_clean_and_random_noise(trained, norm):
    model, x, y = trained
    eps = EPS[norm]
    noise = threat.draw_noise(x, norm, torch.Generator().manual_seed(5))
    random_point = x + threat.random_start(x, noise, norm, eps)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        noisy = F.cross_entropy(model(random_point), y, reduction="none")
    for attack in (pgd(norm), pgd(norm, random_start=False), pgd(norm, early_stop=True), fgsm(norm, eps)):
        with torch.no_grad():
            adv = F.cross_entropy(model(run(attack, model, x, y)), y, reduction="none")
        assert (adv > clean).float().mean() > 0.95, attack
        assert adv.mean() > 3 * clean.mean() and adv.mean() > 2 * noisy.mean(), attack


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("l2", "ce"), ("l1", "ce"), ("linf", "cw"),
                                       ("l2", "dlr")])
def test_targeted_pgd_reaches_the_target_far_more_often_than_chance(trained, norm, loss):
    model, x, y = trained
    g = torch.Generator().manual_seed(7)
    target = (y + torch.randint(1, CLASSES, y.shape, generator=g)) % CLASSES
    # At 4 eps untargeted PGD leaves ~0 robust. Early stopping keeps the step at which the target
    # is reached: fixed-size steps on the scale-free DLR otherwise overshoot (L2: 43 % at the end).
    attack = pgd(norm, eps=4 * EPS[norm], steps=20, loss=loss, targeted=True, early_stop=True)
    with torch.no_grad():
        before = (model(x).argmax(1) == target).float().mean().item()
        reached = (model(run(attack, model, x, target, labels=y)).argmax(1) == target).float().mean().item()
    assert before < 0.05 and reached > 0.8, (before, reached)  # chance: 1 / (CLASSES - 1)


@pytest.mark.parametrize("norm", NORMS)
def test_more_steps_or_restarts_never_raise_robust_accuracy(trained, norm):
    model, x, y = trained
    for early_stop, tol in ((True, 0.0), (False, 0.01)):  # early stopping makes it exact
        accs = [accuracy(model, run(pgd(norm, steps=s, step_size=EPS[norm] / 4, early_stop=early_stop),
                                    model, x, y), y) for s in (1, 3, 10, 30)]
        assert all(b <= a + tol for a, b in itertools.pairwise(accs)), (early_stop, accs)
        assert accs[-1] < accs[0]
    tol = 0.005
    one = pgd(norm)
    several = pgd(norm, restarts=4)
    noise1 = one.init_noise(x, torch.Generator().manual_seed(0))
    noise4 = several.init_noise(x, torch.Generator().manual_seed(1))
    noise4[..., 0] = noise1  # the first restart is the single run
    acc1 = accuracy(model, one(model, x, y, noise=noise1), y)
    acc4 = accuracy(model, several(model, x, y, noise=noise4), y)
    assert acc4 <= acc1 + tol, (acc1, acc4)


@pytest.mark.parametrize("norm", NORMS)
def test_large_eps_breaks_every_point(trained, norm):
    model, x, y = trained
    eps = {"linf": 0.5, "l2": 0.5 * math.sqrt(DIM), "l1": 0.5 * DIM}[norm]
    assert accuracy(model, run(pgd(norm, eps=eps, step_size=2.5 * eps / 10), model, x, y), y) < 0.02


def test_early_stopping_keeps_the_first_successful_point(trained):
    model, x, y = trained
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any()
    x_adv = pgd("linf", random_start=False, early_stop=True)(model, x, y)
    assert torch.equal(x_adv[wrong], x[wrong])  # already misclassified: never moved
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).sum() >= (model(x).argmax(1) != y).sum()
    moved = pgd("linf", random_start=False)(model, x, y)  # the default moves every point
    assert not torch.equal(moved[wrong], x[wrong])


# -- execution: BatchNorm, vmap, precision, training losses -------------------------------------


def test_attacking_an_eval_mode_batchnorm_model_leaves_its_running_stats_alone(bn_model):
    state = {k: v.clone() for k, v in bn_model.state_dict().items()}
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % CLASSES
    for norm in NORMS:
        for attack in (pgd(norm, steps=3, restarts=2), fgsm(norm, EPS[norm])):
            run(attack, bn_model, x, y)
    assert not bn_model.training
    for k, v in bn_model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("norm", NORMS)
def test_attack_under_vmap_over_tasks_equals_the_per_task_loop(trained, norm):
    model, x, y = trained
    # float64: in float32 the two kernels' round-off flips near-tied gradient signs (numerics.py)
    model = float64_copy(model)
    forward = functional_forward(model)
    params = {k: v.detach() for k, v in params_of(model).items()}
    xs, ys = x[:120].double().reshape(3, 40, *SHAPE), y[:120].reshape(3, 40)
    eps = EPS[norm] * torch.linspace(0.5, 1.5, 40, dtype=torch.float64)
    attack = pgd(norm, steps=5, eps=eps, restarts=2, early_stop=True)
    noise = attack.init_noise(xs, torch.Generator().manual_seed(0))
    assert noise.shape == (*xs.shape, 2)

    def one(p, xi, yi, ni):
        return attack(lambda v: forward(p, v), xi, yi, noise=ni)

    batched = torch.func.vmap(one, in_dims=(None, 0, 0, 0))(params, xs, ys, noise)
    looped = torch.stack([one(params, xs[t], ys[t], noise[t]) for t in range(3)])
    # Reductions per step over the DIM pixels of a sample: L2, two norms (the direction's, the
    # projection's); L1, the projection's cumulative sum. Each restart starts afresh.
    atol = vmap_attack_atol(norm, attack.steps, float(eps.max()), terms=2 * DIM)
    torch.testing.assert_close(batched, looped, atol=atol, rtol=0)


def test_attack_inside_no_grad_equals_outside_and_leaves_parameters_alone(trained):
    """The evaluation attacks under ``torch.no_grad()``; nothing may accumulate into ``.grad``."""
    model, x, y = trained
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for norm in NORMS:
        attack = pgd(norm, restarts=2)
        noise = attack.init_noise(x, torch.Generator().manual_seed(0))
        with torch.no_grad():
            inside = attack(model, x, y, noise=noise)
        assert torch.equal(inside, attack(model, x, y, noise=noise))
    for p, before in zip(model.parameters(), grads):
        assert (p.grad is None and before is None) or torch.equal(p.grad, before)


def test_half_precision_logits_are_handled_in_float32(trained):
    model, x, y = trained
    for norm in NORMS:
        attack = pgd(norm)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_adv = run(attack, model, x, y)
        bf16 = run(attack, lambda v: model(v).to(torch.bfloat16), x, y)
        for out in (x_adv, bf16):
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert threat.in_threat_model(x, out, norm, EPS[norm]).all()
        assert accuracy(model, bf16, y) < accuracy(model, x, y) - 0.1


def test_training_losses_are_passed_positionally(trained):
    """The training call sites: ``attack(forward, x, target, loss, noise)`` with a batch-sum loss."""
    model, x, y = trained
    attack = PGD("linf", 8 / 255, 2 / 255, 10)
    assert isinstance(attack, PGD) and attack.norm == "linf" and attack.random_start
    noise = attack.init_noise(x, torch.Generator().manual_seed(0))
    own = PGD("linf", 8 / 255, 2 / 255, 10)(model, x, y, noise=noise)
    torch.testing.assert_close(attack(model, x, y, cross_entropy_sum, noise), own, atol=1e-6, rtol=0)
    with torch.no_grad():
        clean_log_probs = F.log_softmax(model(x), dim=-1)
    for restarts in (1, 2):
        trades = PGD("linf", 8 / 255, 2 / 255, 5, restarts=restarts)
        x_adv = trades(model, x, clean_log_probs, kl_from_clean,
                       trades.init_noise(x, torch.Generator().manual_seed(0)))
        assert threat.in_threat_model(x, x_adv, "linf", 8 / 255).all()
        with torch.no_grad():
            assert kl_from_clean(model(x_adv), clean_log_probs) > 0.1 * len(x) * 0.01


# -- registry, configuration, errors ------------------------------------------------------------


def test_registry_builds_pgd_fgsm_and_fgsm_rs_from_the_config():
    for name in ("pgd", "fgsm", "fgsm_rs"):
        assert name in ATTACKS
    assert all(desc for _, desc in ATTACKS.describe())
    cfg = AttackConfig(name="pgd", norm="l2", eps=0.5, steps=20, step_size=0.1, restarts=3, loss="dlr",
                       targeted=True)
    attack = build_attack(cfg)
    assert (attack.norm, attack.eps, attack.steps, attack.step_size, attack.restarts, attack.loss,
            attack.targeted) == ("l2", 0.5, 20, 0.1, 3, "dlr", True)
    one = build_attack(AttackConfig(name="fgsm", norm="l1", eps=12.0))
    assert (one.steps, one.step_size, one.random_start, one.norm) == (1, 12.0, False, "l1")
    rs = build_attack(AttackConfig(name="fgsm_rs", eps=8 / 255))
    assert (rs.steps, rs.random_start) == (1, True) and rs.step_size == pytest.approx(1.25 * 8 / 255)


def test_bad_arguments_are_rejected(trained):
    model, x, y = trained
    bad = [({"norm": "l3"}, "norm"), ({"eps": -0.1}, "eps"), ({"restarts": 0}, "restarts"),
           ({"loss": "mse"}, "loss"), ({"steps": 0}, "steps"), ({"l1_quantile": 1.0}, "quantile")]
    for kwargs, match in bad:
        base = {"norm": "linf", "eps": 0.1, "step_size": 0.01, "steps": 5} | kwargs
        with pytest.raises(ValueError, match=match):
            PGD(**base)
    with pytest.raises(ValueError, match="init_noise"):
        pgd("l2")(model, x, y)
    with pytest.raises(ValueError, match="shape"):
        attack = pgd("l2", restarts=3)
        attack(model, x, y, noise=pgd("l2").init_noise(x))


# -- cross-check against torchattacks -----------------------------------------------------------


def test_pgd_linf_and_l2_agree_with_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    eps, alpha = EPS["linf"], EPS["linf"] / 4
    torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
    theirs_attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=10, random_start=True)
    theirs = accuracy(model, theirs_attack(x, y), y)
    ours = accuracy(model, run(PGD("linf", eps, alpha, 10), model, x, y), y)
    assert abs(ours - theirs) <= TORCHATTACKS_TOLERANCE, (ours, theirs)
    assert 0.2 < ours < 0.95  # a budget where the comparison means something

    eps, alpha = EPS["l2"], EPS["l2"] / 4
    torch.manual_seed(0)
    theirs_attack = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=10, random_start=True)
    theirs = accuracy(model, theirs_attack(x, y), y)
    ours = accuracy(model, run(PGD("l2", eps, alpha, 10), model, x, y), y)
    assert abs(ours - theirs) <= TORCHATTACKS_TOLERANCE, (ours, theirs)
    assert 0.2 < ours < 0.95

    eps = 12 / 255
    torch.manual_seed(0)
    theirs = accuracy(model, torchattacks.FFGSM(model, eps=eps, alpha=1.25 * eps)(x, y), y)
    ours = accuracy(model, run(fgsm_rs("linf", eps), model, x, y), y)
    assert abs(ours - theirs) <= TORCHATTACKS_TOLERANCE, (ours, theirs)


def test_fgsm_equals_torchattacks_fgsm_exactly(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    x, y = x[:256], y[:256]  # a power-of-two batch: their mean and our sum give bit-equal signs
    for eps in (2 / 255, 8 / 255, 0.1):
        theirs = torchattacks.FGSM(model, eps=eps)(x, y)
        ours = fgsm("linf", eps)(model, x, y)
        assert torch.equal(ours, theirs)
        assert torch.equal(build_attack(AttackConfig(name="fgsm", eps=eps))(model, x, y), theirs)

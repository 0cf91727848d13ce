"""APGD (Croce & Hein 2020; L1: 2021) against the reference AutoAttack code, and its properties.

Agreement with the reference (``pyautoattack``, the code of Croce & Hein):

- Same random start: the reference seeds the global generator and draws ``rand``/``randn`` of
  the batch's shape; a ``torch.Generator`` with the same seed draws the same numbers, so the
  untargeted attacks must agree point by point: the same outcome for at least 98 % of the points
  and the same adversarial point (to 1e-5) wherever both fool the model. (On the project's CPU
  every outcome and point is equal to the bit, but the two codes need not round alike elsewhere.)
- Different random starts: robust accuracy of APGD-CE and APGD-T within ``TOL`` (3 points of
  accuracy on 128 points) of the reference's, never higher by more than that; the same for
  the AutoAttack cascade APGD-CE then APGD-T.

The model: an MLP with batch norm (eval mode) on 10 noisy prototype classes of 8x8 images,
accurate when clean, at radii where about half the points are robust. Every test keeps the
step counts small (the whole file runs in about 15 s on one core).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import prototype_classifier
from numerics import float64_copy, vmap_attack_atol
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted, L1_projection
from torch import nn

from metarobust.attacks.apgd import APGD, checkpoints, l1_eps_schedule, l1_projection
from metarobust.attacks.losses import cw_per_sample, dlr_targeted_per_sample
from metarobust.attacks.pgd import PGD
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig
from metarobust.errors import ConfigError
from metarobust.meta.functional import functional_forward, params_of

TOL = 0.03
"""Robust-accuracy tolerance against the reference: 3 points of accuracy (4 of 128 points)."""

CLASSES = 10
EPS = {"linf": 0.16, "l2": 1.0, "l1": 4.0}
"""Radii at which roughly half of the test points are robust (most informative)."""
REF_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these kernels are tiny, and on a busy 2-core machine two spinning
    threads per op slow the file down twenty-fold (measured: 14 s with one thread, 300 s with
    two while another job held a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    """An accurate MLP with batch norm (eval mode), and 128 fresh test points."""
    return prototype_classifier(128, CLASSES)


def ours(model, x, y, seed=0, **kw):
    attack = APGD(**kw)
    return attack(model, x, y, noise=attack.init_noise(x, torch.Generator().manual_seed(seed)))


@torch.no_grad()
def robust(model, x_adv, y):
    return model(x_adv).argmax(1) == y


def acc(model, x_adv, y) -> float:
    return robust(model, x_adv, y).float().mean().item()


def reference(model, x, y, norm, eps, steps, targeted=False, seed=0, **kw):
    cls = APGDAttack_targeted if targeted else APGDAttack
    return cls(model, n_iter=steps, norm=REF_NORM[norm], eps=eps, seed=seed, device="cpu", **kw).perturb(x, y)


def norms(d: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = d.flatten(1)
    return {"linf": flat.abs().amax(1), "l2": flat.norm(dim=1), "l1": flat.abs().sum(1)}


# -- the schedule and the projection against the reference ---------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 37, 50, 100, 1000])
def test_checkpoints_match_the_reference_counter(steps):
    # The reference's loop: a checkpoint when `counter3 == k`, then k shrinks.
    k, n_min, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    expected, counter = {}, 0
    for i in range(steps):
        counter += 1
        if counter == k:
            expected[i] = k
            k, counter = max(k - decr, n_min), 0
    assert checkpoints(steps) == expected
    if steps == 100:  # p_1 = 0.22: the first window is 22 iterations, then 19, 16...
        assert list(expected.items())[:3] == [(21, 22), (40, 19), (56, 16)]


def test_l1_eps_schedule_spends_all_steps_and_ends_at_eps():
    assert l1_eps_schedule(2.0, 100) == [(6.0, 30), (4.0, 30), (2.0, 40)]
    for steps in (1, 4, 7, 50):
        stages = l1_eps_schedule(1.0, steps)
        assert stages[-1][0] == 1.0 and (sum(n for _, n in stages) == steps or steps < 4)


def test_l1_projection_matches_the_reference_and_lands_in_the_ball_and_box():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 8, 8, generator=g)
    d = torch.randn(16, 1, 8, 8, generator=g) * torch.linspace(0.01, 1, 16).view(-1, 1, 1, 1)
    for eps in (0.5, 3.0, 20.0):
        ours_ = l1_projection(x, d, eps)
        torch.testing.assert_close(ours_, L1_projection(x, d, eps), atol=1e-6, rtol=0)
        z = x + d + ours_
        assert (norms(z - x)["l1"] <= eps * (1 + 1e-5) + 1e-5).all()  # float32 rounding of x + d - x
        assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
    inside = 0.001 * torch.sign(torch.randn(16, 1, 8, 8, generator=g)) * (x > 0.01) * (x < 0.99)
    assert l1_projection(x, inside, 20.0).abs().max() == 0  # already feasible: left alone


# -- agreement with the reference ----------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_same_random_start_reproduces_the_reference_point_by_point(trained, norm):
    model, x, y = trained
    assert acc(model, x, y) == 1.0  # the reference then attacks (and draws noise for) every point
    kw = {"l1_large_eps": False} if norm == "l1" else {}
    mine = ours(model, x, y, 0, norm=norm, eps=EPS[norm], steps=50, **kw)
    ref = reference(model, x, y, norm, EPS[norm], 50, seed=0)
    fooled_mine, fooled_ref = ~robust(model, mine, y), ~robust(model, ref, y)
    assert (fooled_mine == fooled_ref).float().mean() >= 0.98
    both = fooled_mine & fooled_ref
    torch.testing.assert_close(mine[both], ref[both], atol=1e-5, rtol=0)  # the same iterate


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("targeted", [False, True], ids=["apgd-ce", "apgd-t"])
def test_robust_accuracy_agrees_with_the_reference(trained, norm, targeted):
    model, x, y = trained
    eps, steps = EPS[norm], 50
    # Different random starts (seed 1 vs the reference's 0): agreement is not a shared draw.
    # AutoAttack's L1 setting: 5 restarts for APGD-CE, whose single runs vary by +-4 points of
    # accuracy from seed to seed here (0.58 to 0.64 over 5 seeds), in the reference as in ours.
    restarts = 5 if norm == "l1" and not targeted else 1
    x_mine = ours(model, x, y, 1, norm=norm, eps=eps, steps=steps, restarts=restarts, targeted=targeted)
    mine = acc(model, x_mine, y)
    ref = acc(model, reference(model, x, y, norm, eps, steps, targeted, seed=0, n_restarts=restarts,
                               use_largereps=norm == "l1"), y)
    assert 0.1 < ref < 0.9, f"eps={eps} should leave a mid-range robust accuracy, got {ref}"
    assert abs(mine - ref) <= TOL, f"{norm} targeted={targeted}: ours {mine:.3f}, reference {ref:.3f}"


def test_cascade_agrees_with_reference_autoattack_apgd_ce_then_apgd_t(trained):
    model, x, y = trained
    eps = EPS["linf"]
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)
    aa.apgd.n_restarts = 1  # as AutoAttack 'standard' sets it for L-inf and L2
    x_aa, _ = aa.run_standard_evaluation(x, y, batch_size=len(y))
    ref = acc(model, x_aa, y)
    ce = robust(model, ours(model, x, y, 1, norm="linf", eps=eps, steps=100), y)
    t = robust(model, ours(model, x, y, 2, norm="linf", eps=eps, steps=100, targeted=True), y)
    mine = (ce & t).float().mean().item()  # the cascade: a point survives both attacks
    assert abs(mine - ref) <= TOL, f"ours {mine:.3f}, AutoAttack apgd-ce + apgd-t {ref:.3f}"


def test_our_cascade_is_never_weaker_than_the_stronger_peer(trained):
    """torchattacks' AutoAttack builds APGD/APGD-T with 10 iterations (the reference: 100), so it
    overstates robustness; our 100-step cascade must be at most the stronger of the two peers
    (plus one point of 128: the random starts differ)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    eps = EPS["linf"]
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0)
    aa.apgd.n_restarts = 1
    ref = acc(model, aa.run_standard_evaluation(x, y, batch_size=len(y))[0], y)
    # torchattacks.AutoAttack(version="standard") without FAB and Square, as it builds the two APGDs
    ta = torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, seed=0, loss="ce", n_restarts=1),
        torchattacks.APGDT(model, norm="Linf", eps=eps, seed=0, n_classes=CLASSES, n_restarts=1)])
    theirs = acc(model, ta(x, y), y)
    ce = robust(model, ours(model, x, y, 1, norm="linf", eps=eps, steps=100), y)
    t = robust(model, ours(model, x, y, 2, norm="linf", eps=eps, steps=100, targeted=True), y)
    mine = (ce & t).float().mean().item()
    print(f"cascade: ours {mine:.3f}, reference {ref:.3f}, torchattacks {theirs:.3f}")
    assert mine <= min(ref, theirs) + 1 / len(y), f"ours {mine:.3f}, reference {ref:.3f}, torchattacks {theirs:.3f}"


# -- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_outputs_stay_in_the_eps_ball_and_the_unit_box(trained, norm):
    model, x, y = trained
    for scale in (0.25, 1.0, 4.0):
        eps = EPS[norm] * scale
        for targeted in (False, True):
            x_adv = ours(model, x, y, norm=norm, eps=eps, steps=10, targeted=targeted, target_classes=2)
            assert (norms(x_adv - x)[norm] <= eps * (1 + 1e-6) + 1e-5).all()
            assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_apgd_is_at_least_as_strong_as_pgd10(trained):
    model, x, y = trained
    eps = EPS["linf"]
    pgd = PGD("linf", eps, eps / 4, 10)
    pgd_acc = acc(model, pgd(model, x, y, noise=pgd.init_noise(x, torch.Generator().manual_seed(0))), y)
    apgd_acc = acc(model, ours(model, x, y, norm="linf", eps=eps, steps=20), y)
    assert apgd_acc <= pgd_acc + 0.01, f"APGD-20 {apgd_acc:.3f} vs PGD-10 {pgd_acc:.3f}"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_more_steps_or_restarts_never_help_the_model(trained, norm):
    model, x, y = trained
    eps = EPS[norm]
    few = acc(model, ours(model, x, y, norm=norm, eps=eps, steps=10), y)
    many = acc(model, ours(model, x, y, norm=norm, eps=eps, steps=50), y)
    assert many <= few + 0.02, f"10 steps {few:.3f}, 50 steps {many:.3f}"
    # Restart 1 of three draws the numbers of a single restart, and a later restart only adds
    # broken points: no tolerance needed.
    one = robust(model, ours(model, x, y, norm=norm, eps=eps, steps=20, restarts=1), y)
    three = robust(model, ours(model, x, y, norm=norm, eps=eps, steps=20, restarts=3), y)
    assert not (three & ~one).any()


@pytest.mark.parametrize("norm, eps", [("linf", 0.5), ("l2", 0.5 * 8), ("l1", 0.5 * 64)])
def test_a_large_eps_breaks_every_point(trained, norm, eps):
    model, x, y = trained
    assert acc(model, ours(model, x, y, norm=norm, eps=eps, steps=20), y) <= 0.01


def test_targeted_attack_reaches_its_target(trained):
    model, x, y = trained
    eps = 0.25
    with torch.no_grad():
        runner_up = model(x).sort(dim=1)[1][:, -2]
    x_adv = ours(model, x, y, norm="linf", eps=eps, steps=20, targeted=True, target_classes=1)
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    fooled = pred != y
    # Chance among the 9 wrong classes is 1/9; a bigger step past the target may land elsewhere.
    assert fooled.float().mean() > 0.5 and (pred[fooled] == runner_up[fooled]).float().mean() > 0.5

    # A far target of our own through a custom targeted loss: by chance a point would land on it
    # at most 1/9 of the time (one of 9 wrong classes), or as often as the untargeted attack.
    far = (y + 5) % CLASSES

    def to_far(logits, y_, _runner_up):
        return dlr_targeted_per_sample(logits, y_, far)

    attack = APGD("linf", eps, steps=20, targeted=True, target_classes=1)
    x_adv = attack(model, x, y, loss=to_far, noise=attack.init_noise(x, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == far).float().mean().item()
    untargeted = ours(model, x, y, norm="linf", eps=eps, steps=20)
    with torch.no_grad():
        by_chance = (model(untargeted).argmax(1) == far).float().mean().item()
    # Measured: 0.45 of the points land on the far class, 0.09 under the untargeted attack.
    assert hit > 3 * max(by_chance, 1 / 9), f"target hit {hit:.3f}, untargeted {by_chance:.3f}"


def test_the_model_is_left_untouched(trained):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)  # a batch-norm model, in eval mode
    for kw in ({"norm": "linf"}, {"norm": "l2", "targeted": True, "target_classes": 2}, {"norm": "l1"}):
        ours(model, x, y, eps=EPS[kw["norm"]], steps=5, **kw)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kw", [
    {"norm": "linf", "restarts": 2},
    {"norm": "l2", "targeted": True, "target_classes": 3},
    {"norm": "l1", "restarts": 1},
], ids=["linf-restarts", "l2-targeted", "l1"])
def test_functional_model_under_vmap_equals_per_task_loop(trained, kw):
    model, x, y = trained
    # float64: in float32 the two kernels' round-off flips near-tied gradient signs (numerics.py)
    model = float64_copy(model)
    forward = functional_forward(model)
    params = {k: v.detach() for k, v in params_of(model).items()}
    xs, ys = x[:60].double().view(3, 20, 1, 8, 8), y[:60].view(3, 20)
    attack = APGD(eps=EPS[kw["norm"]], steps=10, **kw)
    noise = attack.init_noise(xs, torch.Generator().manual_seed(0))
    assert noise.shape == (*xs.shape, attack.runs)  # runs last: tasks stay on dim 0

    def one(p, xi, yi, ni):
        return attack(lambda v: forward(p, v), xi, yi, noise=ni)

    batched = torch.func.vmap(one, in_dims=(None, 0, 0, 0))(params, xs, ys, noise)
    looped = torch.stack([one(params, xs[t], ys[t], noise[t]) for t in range(3)])
    # Reductions per step: L2, three norms over the 64 pixels (the direction, two projections);
    # L1, one projection summing 2 x 64 breakpoints (plus one per stage start): at most 3 x 64
    # terms. The largest perturbation is L1's first stage at 3 eps (l1_eps_schedule), else eps.
    radius = (3 if kw["norm"] == "l1" else 1) * attack.eps
    atol = vmap_attack_atol(kw["norm"], attack.steps, radius, terms=3 * 64)
    torch.testing.assert_close(batched, looped, atol=atol, rtol=0)
    with torch.no_grad():  # as the evaluation calls it: torch.func.grad still differentiates
        torch.testing.assert_close(one(params, xs[0], ys[0], noise[0]), looped[0], atol=atol, rtol=0)


def test_loss_override_by_name_or_callable(trained):
    model, x, y = trained
    attack = APGD("linf", EPS["linf"], steps=10)
    noise = attack.init_noise(x, torch.Generator().manual_seed(0))
    by_name = attack(model, x, y, loss="cw", noise=noise)
    torch.testing.assert_close(attack(model, x, y, loss=cw_per_sample, noise=noise), by_name)
    configured = APGD("linf", EPS["linf"], steps=10, loss="cw")
    torch.testing.assert_close(configured(model, x, y, noise=noise), by_name)
    assert APGD("linf", 0.1).loss == "ce" and APGD("linf", 0.1, targeted=True).loss == "dlr"


def test_clear_errors(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="attack.norm"):
        APGD("l0", 0.1)
    with pytest.raises(ValueError, match="attack.loss"):
        APGD("linf", 0.1, loss="hinge")
    with pytest.raises(ValueError, match="attack.eps"):
        APGD("linf", -0.1)
    attack = APGD("linf", 0.1, steps=2, restarts=2)
    with pytest.raises(ValueError, match="init_noise"):
        attack(model, x, y)
    with pytest.raises(ValueError, match="runs"):
        attack(model, x, y, noise=torch.zeros(*x.shape, 1))
    with pytest.raises(ValueError, match="per-sample"):
        attack(model, x, y, loss=lambda logits, t: F.cross_entropy(logits, t), noise=attack.init_noise(x))
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    targeted = APGD("linf", 0.1, steps=2, targeted=True)
    with pytest.raises(ValueError, match="4 classes"):
        targeted(three, x, y % 3, noise=targeted.init_noise(x))


def test_registry_builds_apgd_and_apgd_t_from_the_config():
    cfg = AttackConfig(name="apgd", norm="l2", eps=0.5, steps=7, restarts=2, loss="dlr")
    assert ATTACKS.get("apgd")(cfg) == APGD("l2", 0.5, 7, 2, "dlr")
    t = ATTACKS.get("apgd_t")(AttackConfig(name="apgd_t", eps=0.03, steps=100, target_classes=4))
    assert t == APGD("linf", 0.03, 100, 1, "dlr", True, 4) and t.runs == 4
    with pytest.raises(ConfigError, match="attack.loss"):
        ATTACKS.get("apgd_t")(AttackConfig(name="apgd_t", loss="cw"))
    described = dict(ATTACKS.describe())
    assert "Croce & Hein" in described["apgd"] and "targeted" in described["apgd_t"]

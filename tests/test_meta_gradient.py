"""The meta-gradient of both executions equals independent references (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarobust.attacks import PGD, cross_entropy_sum
from metarobust.config import ExperimentConfig, experiment_schema
from metarobust.data.episode import EpisodeBatch
from metarobust.meta.execution import meta_backward
from metarobust.meta.functional import functional_forward, params_of
from metarobust.meta.maml import MAML
from metarobust.models.conv4 import Conv4
from metarobust.training.recipes import RECIPES

WAYS, SHOTS, QUERIES, TASKS, SIZE = 3, 2, 3, 3, 16


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make_batch(seed: int = 0) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    sy = labels.repeat_interleave(SHOTS).expand(TASKS, -1)
    qy = labels.repeat_interleave(QUERIES).expand(TASKS, -1)
    return EpisodeBatch(
        support_x=torch.rand(TASKS, WAYS * SHOTS, 1, SIZE, SIZE, generator=g),
        support_y=sy.clone(), query_x=torch.rand(TASKS, WAYS * QUERIES, 1, SIZE, SIZE, generator=g),
        query_y=qy.clone(), classes=labels.expand(TASKS, -1).clone(),
        support_index=torch.zeros_like(sy), query_index=torch.zeros_like(qy),
    )


def make_model() -> Conv4:
    torch.manual_seed(0)
    return Conv4(1, WAYS, SIZE, hidden=4)


def reference_forward(w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Conv-4 written independently from ``torch.nn.functional`` (and PyTorch's own batch norm)."""
    x = (x - 0.5) / 0.5
    for block in range(4):
        conv_w, conv_b, bn_w, bn_b = w[4 * block : 4 * block + 4]
        x = F.conv2d(x, conv_w, conv_b, padding=1)
        x = F.batch_norm(x, None, None, bn_w, bn_b, training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), w[16], w[17])


def reference_meta_gradient(model, batch, lr, steps, first_order) -> list[torch.Tensor]:
    """Task by task with ``torch.autograd.grad(create_graph=True)``."""
    init = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0
    for t in range(batch.num_tasks):
        w = init
        for _ in range(steps):
            loss = F.cross_entropy(reference_forward(w, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, w, create_graph=not first_order)
            w = [p - lr * g for p, g in zip(w, grads)]
        total = total + F.cross_entropy(reference_forward(w, batch.query_x[t]), batch.query_y[t])
    return list(torch.autograd.grad(total / batch.num_tasks, init))


def our_meta_gradient(model, batch, lr, steps, first_order, execution, recipe="maml", noise=None):
    model.zero_grad(set_to_none=True)
    learner = MAML(functional_forward(model), lr, steps, first_order)
    attack = PGD("linf", 8 / 255, 10 / 255, 2)
    task_fn = RECIPES.get(recipe)(ExperimentConfig(recipe=recipe)).task(learner, attack)
    loss, _ = meta_backward(task_fn, params_of(model), batch, noise, execution)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("execution", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_autograd_reference(execution, first_order):
    model, batch = make_model(), make_batch()
    expected = reference_meta_gradient(model, batch, lr=0.3, steps=2, first_order=first_order)
    _, ours = our_meta_gradient(model, batch, 0.3, 2, first_order, execution)
    for e, o in zip(expected, ours):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-11)


def test_second_order_differs_from_first_order():
    """Guards the test above: the second-order terms are not negligible here."""
    model, batch = make_model(), make_batch()
    _, second = our_meta_gradient(model, batch, 0.3, 2, False, "loop")
    _, first = our_meta_gradient(model, batch, 0.3, 2, True, "loop")
    gap = max(float((a - b).abs().max()) for a, b in zip(second, first))
    assert gap > 1e-4


def test_meta_gradient_matches_higher():
    higher = pytest.importorskip("higher")
    model, batch = make_model(), make_batch()
    model.zero_grad()
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for t in range(batch.num_tasks):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.cross_entropy(fmodel(batch.support_x[t]), batch.support_y[t]))
            (F.cross_entropy(fmodel(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for execution in ("loop", "vmap"):
        _, ours = our_meta_gradient(model, batch, 0.3, 2, False, execution)
        for e, o in zip(expected, ours):
            torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-11)


def test_meta_gradient_matches_learn2learn():
    l2l = pytest.importorskip("learn2learn", reason="learn2learn does not build on Python 3.11 here")
    model, batch = make_model(), make_batch()
    model.zero_grad()
    maml = l2l.algorithms.MAML(model, lr=0.3)
    for t in range(batch.num_tasks):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
        (F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    _, ours = our_meta_gradient(model, batch, 0.3, 2, False, "loop")
    for e, o in zip(expected, ours):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-11)


# Every meta recipe, with the settings that change its computation; 2 inner steps so that the
# per-step support attacks of adml and r_maml (in) differ between steps.
RECIPE_CASES = {
    "maml": {}, "anil": {}, "adversarial_querying": {}, "adml": {},
    "r_maml_out_trades": {"recipe": "r_maml", "robust.form": "trades"},
    "r_maml_out_ce": {"recipe": "r_maml", "robust.form": "ce"},
    "r_maml_in": {"recipe": "r_maml", "robust.placement": "in", "robust.inner_weight": 2.0},
    "trades_maml": {}, "its_maml": {"meta.train_shots": 2},
}


def recipe_config(case: str, **more) -> ExperimentConfig:
    """A config for ``case`` (the dataclass, set field by field: no data-dependent validation)."""
    values = {"recipe": case, "meta.inner_lr": 0.3, "meta.inner_steps": 2, "train_attack.eps": 0.0314,
              "train_attack.steps": 2, "train_attack.step_size": 0.04, **RECIPE_CASES[case], **more}
    cfg = experiment_schema()()  # the core sections and every recipe-owned one (robust)
    for key, value in values.items():
        *path, name = key.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        setattr(section, name, value)
    return cfg


def recipe_meta_gradient(cfg, model, batch, execution, noise):
    from metarobust.attacks import build_attack
    from metarobust.training.recipes import build_recipe

    model.zero_grad(set_to_none=True)
    recipe = build_recipe(cfg)
    task_fn = recipe.task(recipe.learner(model), build_attack(cfg.train_attack))
    loss, stats = meta_backward(task_fn, params_of(model), batch, noise, execution)
    return loss, stats, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_every_recipe_gives_the_same_meta_gradient_in_both_executions(case):
    """Loop and vmap agree to float64 precision for each recipe, attacks included (fixed noise)."""
    from metarobust.training.recipes import build_recipe

    cfg, model, batch = recipe_config(case), make_model(), make_batch(1)
    noise = build_recipe(cfg).draw_noise(batch, torch.Generator().manual_seed(3))
    loss_loop, stats_loop, loop = recipe_meta_gradient(cfg, model, batch, "loop", noise)
    loss_vmap, stats_vmap, vmapped = recipe_meta_gradient(cfg, model, batch, "vmap", noise)
    assert torch.isfinite(loss_loop)
    torch.testing.assert_close(loss_vmap, loss_loop, rtol=1e-9, atol=1e-11)
    assert stats_vmap.keys() == stats_loop.keys()
    for k in stats_loop:
        torch.testing.assert_close(stats_vmap[k], stats_loop[k], rtol=1e-9, atol=1e-11)
    for a, b in zip(loop, vmapped):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    assert max(float(g.abs().max()) for g in loop) > 0


def test_anil_meta_gradient_matches_autograd_reference():
    """ANIL: the inner loop differentiates only the head; the body gets the meta-gradient."""
    cfg, model, batch = recipe_config("anil"), make_model(), make_batch(2)
    init = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0
    for t in range(batch.num_tasks):
        w = init
        for _ in range(2):
            loss = F.cross_entropy(reference_forward(w, batch.support_x[t]), batch.support_y[t])
            g_w, g_b = torch.autograd.grad(loss, w[16:], create_graph=True)
            w = [*w[:16], w[16] - 0.3 * g_w, w[17] - 0.3 * g_b]
        total = total + F.cross_entropy(reference_forward(w, batch.query_x[t]), batch.query_y[t])
    expected = torch.autograd.grad(total / batch.num_tasks, init)
    for execution in ("loop", "vmap"):
        _, _, ours = recipe_meta_gradient(cfg, model, batch, execution, None)
        for e, o in zip(expected, ours):
            torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-11)


def _reference_attack(w, x, y, noise, cfg):
    """Our L-inf PGD (the attack is tested elsewhere) against the *reference* forward at detached
    weights: the meta-gradient below is then computed independently of the recipes' code."""
    frozen = [p.detach() for p in w]
    return build_reference_attack(cfg)(lambda z: reference_forward(frozen, z), x, y, cross_entropy_sum, noise)


def build_reference_attack(cfg):
    from metarobust.attacks import build_attack

    return build_attack(cfg.train_attack)


def test_adml_and_r_maml_in_meta_gradients_match_autograd_reference():
    """ADML (two trajectories, the adversarial one re-attacked every step, crossed query losses)
    and R-MAML_both (CE + weight x adversarial CE in the inner loop and the meta-update), written
    out with plain autograd on an independent Conv-4."""
    from metarobust.training.recipes import build_recipe

    model, batch = make_model(), make_batch(3)
    for case in ("adml", "r_maml_in"):
        cfg = recipe_config(case, **({"robust.form": "ce"} if case == "r_maml_in" else {}))
        noise = build_recipe(cfg).draw_noise(batch, torch.Generator().manual_seed(5))
        init = [p.detach().clone().requires_grad_() for p in model.parameters()]
        total = 0
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
            steps_noise, q_noise = noise["support_steps"][t], noise["query"][t]

            def inner(w, robust_weight, clean_weight):
                for s in range(2):
                    x_adv = _reference_attack(w, sx, sy, steps_noise[s], cfg)
                    loss = (clean_weight * F.cross_entropy(reference_forward(w, sx), sy)
                            + robust_weight * F.cross_entropy(reference_forward(w, x_adv), sy))
                    grads = torch.autograd.grad(loss, w, create_graph=True)
                    w = [p - 0.3 * g for p, g in zip(w, grads)]
                return w

            def clean_inner(w):
                for _ in range(2):
                    grads = torch.autograd.grad(F.cross_entropy(reference_forward(w, sx), sy), w, create_graph=True)
                    w = [p - 0.3 * g for p, g in zip(w, grads)]
                return w

            if case == "adml":
                clean, adv = clean_inner(init), inner(init, 1.0, 0.0)
                q_adv = _reference_attack(clean, qx, qy, q_noise, cfg)
                total = total + 0.5 * (F.cross_entropy(reference_forward(adv, qx), qy)
                                       + F.cross_entropy(reference_forward(clean, q_adv), qy))
            else:
                fast = inner(init, 2.0, 1.0)
                q_adv = _reference_attack(fast, qx, qy, q_noise, cfg)
                total = total + (F.cross_entropy(reference_forward(fast, qx), qy)
                                 + cfg.robust.weight * F.cross_entropy(reference_forward(fast, q_adv), qy))
        expected = torch.autograd.grad(total / batch.num_tasks, init)
        for execution in ("loop", "vmap"):
            _, _, ours = recipe_meta_gradient(cfg, model, batch, execution, noise)
            for e, o in zip(expected, ours):
                torch.testing.assert_close(o, e, rtol=1e-8, atol=1e-10, msg=f"{case} {execution}")

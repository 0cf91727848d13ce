"""The meta-gradient of both executions equals independent references (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarobust.attacks import LinfPGD
from metarobust.config import ExperimentConfig
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
    attack = LinfPGD(8 / 255, 10 / 255, 2)
    task_fn = RECIPES.get(recipe)(ExperimentConfig(), learner, attack)
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


@pytest.mark.parametrize("recipe", ["adversarial_querying", "r_maml"])
def test_robust_recipes_give_the_same_meta_gradient_in_both_executions(recipe):
    model, batch = make_model(), make_batch(1)
    noise = LinfPGD(8 / 255, 10 / 255, 2).init_noise(batch.query_x, torch.Generator().manual_seed(3))
    loss_loop, loop = our_meta_gradient(model, batch, 0.3, 1, False, "loop", recipe, noise)
    loss_vmap, vmapped = our_meta_gradient(model, batch, 0.3, 1, False, "vmap", recipe, noise)
    torch.testing.assert_close(loss_vmap, loss_loop, rtol=1e-9, atol=1e-11)
    for a, b in zip(loop, vmapped):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)

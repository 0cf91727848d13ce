"""The meta-gradients of the robust meta-learners equal references written from their definitions.

AQ, R-MAML_out (both robust forms), TRADES-MAML (both KL batches), ITS-MAML and R-MAML_both with
TRADES' KL (its CE form: ``test_meta_gradient.py``), each against a plain per-task
``torch.autograd.grad`` reference (META.md 2.2, 2.3, 1.2) on an independently written Conv-4 in
float64: the inner loop, the attack (L-inf PGD from the recipe's own random-start noise, written
out here against the reference fast weights) and the meta-objective are built from the method's
definition, not from :mod:`metarobust.training.objectives`. The recipe's side is the trainer's
call, ``recipe.backward`` (its own noise draw), in both executions; first and second order.

Each test also computes the reference of a plausible wrong objective (the robust weight ignored,
the attack run at the initial weights instead of the fast ones, the TRADES KL reversed, the KL
taken over another batch, the other order) and checks that it is far from the recipe's gradient: the comparison
would catch that bug.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import U64
from test_meta_gradient import WAYS, make_batch, make_model, recipe_config, reference_forward

from metarobust.training.recipes import Models, StepContext, build_recipe

LR, STEPS, WEIGHT = 0.3, 2, 2.5  # recipe_config's inner loop; a robust weight != 1, so that ignoring it shows
RTOL = 1e8 * U64
"""~1e-8. Reference and recipe do the same float64 arithmetic in other kernels (functional_call
against F.conv2d, other summation orders): they differ by round-off, the ~1e2 terms of each sum
(``numerics.summed_terms``) times u = 1.1e-16 per operation, carried through a second-order
meta-gradient of two inner steps (a few hundred operations deep); 1e8 u leaves orders of magnitude
of margin for that. The attack's sign steps agree unless a gradient coordinate sits within ~1e-14
of zero. A wrong objective moves the gradient by 1e-3 relative or more (the guards below)."""
ATOL = RTOL * 1e-2


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# -- the reference: plain autograd on the independently written Conv-4 ------------------------------

def adapt(w: list[torch.Tensor], sx: torch.Tensor, sy: torch.Tensor, first_order: bool) -> list[torch.Tensor]:
    """MAML's inner loop (Finn et al. 2017, eq. 1): ``STEPS`` SGD steps on the clean support CE."""
    for _ in range(STEPS):
        loss = F.cross_entropy(reference_forward(w, sx), sy)
        grads = torch.autograd.grad(loss, w, create_graph=not first_order)
        w = [p - LR * g for p, g in zip(w, grads, strict=True)]
    return w


def linf_pgd(objective, x: torch.Tensor, noise: torch.Tensor, cfg) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018) written out: start at ``x + eps * noise`` (the recipe's raw
    uniform noise), ascend ``objective(x_adv)`` by signed steps, project onto the ball and the box."""
    eps, step = cfg.train_attack.eps, cfg.train_attack.step_size
    delta = (x + (eps * noise).clamp(-eps, eps)).clamp(0, 1) - x
    for _ in range(cfg.train_attack.steps):
        d = delta.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective(x + d), d)
        delta = (x + (delta + step * g.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    return (x + delta).clamp(0, 1)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i KL(p_i || q_i)``, TRADES' ``KLDivLoss(log q, p)`` (PyTorch's own ``kl_div``)."""
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), reduction="batchmean", log_target=True)


def attacked(w, x, y, noise, cfg, form: str, kl_reversed: bool = False) -> torch.Tensor:
    """``x`` attacked against the detached weights ``w``: maximising the summed CE to ``y``
    (``form="ce"``) or TRADES' KL(p_clean || p_adv) (``"trades"``; reversed: KL(p_adv || p_clean))."""
    frozen = [p.detach() for p in w]
    if form == "ce":
        return linf_pgd(lambda z: F.cross_entropy(reference_forward(frozen, z), y, reduction="sum"), x, noise, cfg)
    clean = reference_forward(frozen, x).detach()
    if kl_reversed:
        return linf_pgd(lambda z: kl(reference_forward(frozen, z), clean) * len(x), x, noise, cfg)
    return linf_pgd(lambda z: kl(clean, reference_forward(frozen, z)) * len(x), x, noise, cfg)


def robust_adapt(cfg, inner_weight: float, attack_at: str = "fast"):
    """R-MAML_both's inner loop (Wang et al. 2021; META.md 2.3): each step descends
    ``CE(f(s), y_s) + inner_weight x KL(p(s) || p(s_adv))``, the support attacked (TRADES' KL)
    against the current fast weights with that step's noise."""
    def inner(w, sx, sy, noise, first_order):
        start = w
        for step in range(STEPS):
            s_adv = attacked(w if attack_at == "fast" else start, sx, sy, noise["support_steps"][step], cfg, "trades")
            clean = reference_forward(w, sx)
            loss = F.cross_entropy(clean, sy) + inner_weight * kl(clean, reference_forward(w, s_adv))
            grads = torch.autograd.grad(loss, w, create_graph=not first_order)
            w = [p - LR * g for p, g in zip(w, grads, strict=True)]
        return w

    return inner


def reference(model, batch, noise, cfg, first_order: bool, objective,
              inner=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(mean task loss, its gradient)`` with ``objective(init, fast, sx, sy, qx, qy, noise_t)``
    the task's meta-loss after the clean inner loop (or ``inner(init, sx, sy, noise_t, first_order)``)."""
    init = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        task_noise = {k: v[t] for k, v in noise.items()}
        fast = adapt(init, sx, sy, first_order) if inner is None else inner(init, sx, sy, task_noise, first_order)
        total = total + objective(init, fast, sx, sy, qx, qy, task_noise)
    total = total / batch.num_tasks
    return total.detach(), list(torch.autograd.grad(total, init))


def aq_objective(cfg, attack_at: str = "fast"):
    """AQ (Goldblum et al. 2020, META.md 2.2): CE of the query attacked through the fast weights
    only; the clean query is not trained on."""
    def objective(init, fast, sx, sy, qx, qy, noise):
        q_adv = attacked(fast if attack_at == "fast" else init, qx, qy, noise["query"], cfg, "ce")
        return F.cross_entropy(reference_forward(fast, q_adv), qy)

    return objective


def r_maml_out_objective(cfg, form: str, weight: float, attack_at: str = "fast", kl_reversed: bool = False):
    """R-MAML_out (Wang et al. 2021, eq. 3; META.md 2.3), ITS-MAML's objective (META.md 1.2):
    ``CE(f_fast(q), y_q) + weight x R``, R = CE(f_fast(q_adv), y_q) or KL(p_clean || p_adv)
    (gradients through both distributions), q_adv maximising R at the fast weights."""
    def objective(init, fast, sx, sy, qx, qy, noise):
        q_adv = attacked(fast if attack_at == "fast" else init, qx, qy, noise["query"], cfg, form, kl_reversed)
        clean, adv = reference_forward(fast, qx), reference_forward(fast, q_adv)
        if form == "ce":
            robust = F.cross_entropy(adv, qy)
        else:
            robust = kl(adv, clean) if kl_reversed else kl(clean, adv)
        return F.cross_entropy(clean, qy) + weight * robust

    return objective


def trades_maml_objective(cfg, weight: float, kl_batch: str = "union", kl_reversed: bool = False, batch=None):
    """TRADES-MAML (R-MAML's TRADES baseline, META.md 2.3): clean query CE + weight x
    KL(p_clean || p_adv) over support and query points at the fast weights, as one batch:
    ``kl_batch="union"``: the task's own support and query (``robust.kl_batch=task``);
    ``"meta_batch"``: every task's supports, then every task's queries, of ``batch``, attacked from
    the task's own start (``robust.kl_batch=meta_batch``, R-MAML's TRADES code); ``"query"``: the
    task's query only (R-MAML's TRADES form)."""
    def objective(init, fast, sx, sy, qx, qy, noise):
        if kl_batch == "union" and "meta_batch" in noise:  # the task's own points, any start
            x, noise_x = torch.cat([sx, qx]), noise["meta_batch"][: len(sx) + len(qx)]
        elif kl_batch == "union":
            x, noise_x = torch.cat([sx, qx]), torch.cat([noise["support"], noise["query"]])
        elif kl_batch == "meta_batch":
            x, noise_x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)]), noise["meta_batch"]
        else:
            x, noise_x = qx, noise["query"]
        x_adv = attacked(fast, x, None, noise_x, cfg, "trades", kl_reversed)
        clean, adv = reference_forward(fast, x), reference_forward(fast, x_adv)
        robust = kl(adv, clean) if kl_reversed else kl(clean, adv)
        return F.cross_entropy(reference_forward(fast, qx), qy) + weight * robust

    return objective


# -- the comparisons ---------------------------------------------------------------------------------

def engine_meta_gradient(cfg, model, batch, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The meta-gradient as the trainer takes it: ``recipe.backward`` (noise drawn from
    ``generator``) into the parameters' ``.grad``."""
    model.zero_grad(set_to_none=True)
    models = Models({"model": model}, {"model": model}, {"model": model}, ["model"])
    ctx = StepContext(step=0, epoch=0, progress=0.0, replay=0, generator=generator, num_classes=WAYS)
    loss, _ = build_recipe(cfg).backward(models, batch, ctx)
    return loss, [p.grad.clone() for p in model.parameters()]


def check(cfg, first_order: bool, objective, wrong: dict, seed: int, inner=None, batch=None) -> None:
    """The recipe's meta-gradient (both executions) equals the reference of ``objective`` (after
    ``inner``, default the clean inner loop) with the noise the recipe draws, and is far from each
    reference of ``wrong`` (name -> objective, or ``(objective, inner)``) and from the right one
    at the other order."""
    model, batch = make_model(), make_batch(seed) if batch is None else batch
    noise = build_recipe(cfg).draw_noise(batch, torch.Generator().manual_seed(seed + 10))
    loss, expected = reference(model, batch, noise, cfg, first_order, objective, inner)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    for execution in ("loop", "vmap"):
        cfg.meta.execution = execution
        ours_loss, ours = engine_meta_gradient(cfg, model, batch, torch.Generator().manual_seed(seed + 10))
        torch.testing.assert_close(ours_loss, loss, rtol=RTOL, atol=ATOL)
        for e, o in zip(expected, ours, strict=True):
            torch.testing.assert_close(o, e, rtol=RTOL, atol=ATOL * scale, msg=lambda m, ex=execution: f"{ex}: {m}")
    wrong = {name: mutant if isinstance(mutant, tuple) else (mutant, inner) for name, mutant in wrong.items()}
    wrong = {"the other order": (not first_order, objective, inner),
             **{name: (first_order, *mutant) for name, mutant in wrong.items()}}
    for name, (order, mutant, mutant_inner) in wrong.items():
        _, other = reference(model, batch, noise, cfg, order, mutant, mutant_inner)
        gap = max(float((a - b).abs().max()) for a, b in zip(ours, other, strict=True))
        assert gap > 1e-3 * scale, f"the reference cannot tell the recipe from '{name}' (gap {gap:.2e})"


def config(case: str, first_order: bool, **more):
    return recipe_config(case, **{"meta.first_order": first_order, "robust.weight": WEIGHT, **more})


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_adversarial_querying_meta_gradient_matches_its_definition(first_order):
    """CE on the query attacked through the fast weights, nothing else."""
    cfg = config("adversarial_querying", first_order)
    check(cfg, first_order, aq_objective(cfg),
          {"attack at the initial weights": aq_objective(cfg, attack_at="init"),
           "clean CE added": r_maml_out_objective(cfg, "ce", 1.0)}, seed=4)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("form", ["trades", "ce"])
def test_r_maml_out_meta_gradient_matches_its_definition(form, first_order):
    """Clean inner loop; clean query CE + weight x R(query) at the fast weights."""
    cfg = config("r_maml_out_" + form, first_order)
    wrong = {"weight ignored": r_maml_out_objective(cfg, form, 1.0),
             "attack at the initial weights": r_maml_out_objective(cfg, form, WEIGHT, attack_at="init")}
    if form == "trades":
        wrong["KL reversed"] = r_maml_out_objective(cfg, form, WEIGHT, kl_reversed=True)
    check(cfg, first_order, r_maml_out_objective(cfg, form, WEIGHT), wrong, seed=5)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_trades_maml_meta_gradient_matches_its_definition(first_order):
    """Clean inner loop; clean query CE + weight x KL(p_clean || p_adv) over support and query."""
    cfg = config("trades_maml", first_order)
    check(cfg, first_order, trades_maml_objective(cfg, WEIGHT),
          {"weight ignored": trades_maml_objective(cfg, 1.0),
           "KL reversed": trades_maml_objective(cfg, WEIGHT, kl_reversed=True),
           "KL over the query only": trades_maml_objective(cfg, WEIGHT, kl_batch="query")}, seed=6)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_trades_maml_with_the_meta_batch_kl_matches_its_definition(first_order):
    """``robust.kl_batch=meta_batch``: task i's KL term covers every task's support and query at
    task i's fast weights, as R-MAML's TRADES code builds it."""
    cfg = config("trades_maml", first_order, **{"robust.kl_batch": "meta_batch"})
    batch = make_batch(9)
    check(cfg, first_order, trades_maml_objective(cfg, WEIGHT, "meta_batch", batch=batch),
          {"weight ignored": trades_maml_objective(cfg, 1.0, "meta_batch", batch=batch),
           "KL reversed": trades_maml_objective(cfg, WEIGHT, "meta_batch", kl_reversed=True, batch=batch),
           "KL over the task's own points": trades_maml_objective(cfg, WEIGHT, "union")}, seed=9, batch=batch)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("form", ["ce", "trades"])
def test_its_maml_meta_gradient_is_r_maml_out_on_its_training_shots(form, first_order):
    """ITS-MAML is R-MAML_out meta-trained on ``meta.train_shots`` (2 here) > ``meta.test_shots``."""
    cfg = config("its_maml", first_order, **{"robust.form": form})
    assert cfg.meta.train_shots > cfg.meta.test_shots
    check(cfg, first_order, r_maml_out_objective(cfg, form, WEIGHT),
          {"weight ignored": r_maml_out_objective(cfg, form, 1.0),
           "attack at the initial weights": r_maml_out_objective(cfg, form, WEIGHT, attack_at="init")}, seed=7)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_r_maml_both_with_trades_meta_gradient_matches_its_definition(first_order):
    """R-MAML_both, TRADES form (the CE form: ``test_meta_gradient.py``): CE + inner_weight x KL on
    the support attacked at every inner step, then R-MAML_out's meta-objective."""
    inner_weight = 1.5
    cfg = config("r_maml_in", first_order, **{"robust.form": "trades", "robust.inner_weight": inner_weight})
    objective = r_maml_out_objective(cfg, "trades", WEIGHT)
    check(cfg, first_order, objective,
          {"clean inner loop": (objective, None),
           "inner weight = robust.weight": (objective, robust_adapt(cfg, WEIGHT)),
           "support attacked at the initial weights": (objective, robust_adapt(cfg, inner_weight, "init"))},
          seed=8, inner=robust_adapt(cfg, inner_weight))

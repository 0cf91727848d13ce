"""Adversarial Weight Perturbation (Wu et al. 2020): one TRADES-AWP and one AT-AWP step equal
transcriptions of the reference code (``csdongxian/AWP`` @a7acf5d) in float64; the perturbation
has norm gamma ||w_l|| per layer; the weights come back after the step but for the optimizer's
update; gamma = 0 and the warm-up epochs are bitwise the plain step; bad settings fail early."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyBN
from torch import nn

from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.experiment import load_config
from metarobust.training.awp import WeightPerturbation, perturbed_names, weight_perturbation
from metarobust.training.data import TrainingData, take
from metarobust.training.engine import Trainer
from metarobust.training.recipes import Models, StepContext, build_recipe

EPS32 = torch.finfo(torch.float32).eps


def setup(recipe: str, dtype=torch.float64, *extra):
    torch.manual_seed(0)
    model = TinyBN().to(dtype).train()
    x = torch.rand(16, 1, 8, 8, dtype=dtype) * 0.98 + 0.01
    y = torch.randint(0, 5, (16,))
    cfg = load_config(None, [f"recipe={recipe}", "train_attack.eps=0.031", "train_attack.step_size=0.007",
                             "train_attack.steps=3", "at.beta=6", "awp.gamma=0.005", *extra])
    return model, EpisodeBatch.plain(x, y, torch.arange(16)), build_recipe(cfg)


def models_of(model):
    return Models({"model": model}, {"model": model}, {"model": model}, ["model"])


def ctx(epoch: int = 0) -> StepContext:
    return StepContext(0, epoch, 0.0, 0, torch.Generator().manual_seed(1), 5)


# -- the reference, transcribed (trades_AWP/utils_awp.py, AT_AWP/utils_awp.py, their train scripts) --
def diff_in_weights(model, proxy):
    diff_dict = OrderedDict()
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + 1e-20) * diff_w
    return diff_dict


def add_into_weights(model, diff, coeff):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name])


def reference_awp_step(model, x, x_adv, y, optimizer, kind, gamma, beta=6.0, proxy_lr=0.1):
    """One step of train_trades_cifar.py (``kind="trades"``) or AT_AWP/train_cifar10.py
    (``"at"``) after the adversarial examples: ``calc_awp``, ``perturb``, the step, ``restore``."""
    proxy = copy.deepcopy(model)
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    if kind == "trades":
        loss_natural = F.cross_entropy(proxy(x), y)
        loss_robust = F.kl_div(F.log_softmax(proxy(x_adv), dim=1), F.softmax(proxy(x), dim=1), reduction="batchmean")
        loss = -1.0 * (loss_natural + beta * loss_robust)
    else:
        loss = -F.cross_entropy(proxy(x_adv), y)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    diff = diff_in_weights(model, proxy)
    add_into_weights(model, diff, gamma)
    model.train()
    if kind == "trades":
        loss_robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="batchmean")
        loss = F.cross_entropy(model(x), y) + beta * loss_robust
    else:
        loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    add_into_weights(model, diff, -gamma)


@pytest.mark.parametrize(("recipe", "kind", "gamma"), [("trades", "trades", 0.005), ("pgd_at", "at", 0.01)])
def test_one_awp_step_equals_the_reference_code(recipe, kind, gamma):
    """Float64, SGD lr 0.1 momentum 0.9 weight decay 5e-4 (the reference's): the parameters after
    our step equal the transcription's to 1e-10, and AWP moved them (the plain step differs).
    BatchNorm's running statistics are not compared: the reference forwards the clean batch twice."""
    model, batch, recipe_obj = setup(recipe, torch.float64, f"awp.gamma={gamma}")
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    x_adv = recipe_obj.inputs(models_of(copy.deepcopy(model)), batch, ctx())  # the same draws as the step's

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, _ = recipe_obj.loss(models_of(model), batch, ctx())
    loss.backward()
    optimizer.step()
    recipe_obj.after_step(models_of(model), batch, ctx())

    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference_awp_step(reference, batch.x, x_adv, batch.y, ref_optimizer, kind, gamma)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    recipe_obj.objective(plain, batch, x_adv)[0].backward()
    plain_optimizer.step()
    for (name, ours), theirs, without in zip(model.named_parameters(), reference.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=name)
    assert any(not torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(model.parameters(), plain.parameters()))


def test_the_perturbation_of_each_layer_has_norm_gamma_times_its_weights_norm():
    """Float32. The perturbed parameters are the conv and linear weights (dimension > 1), each
    ``v_l`` is along the proxy gradient with ``||v_l|| = gamma ||w_l||``; the proxy leaves the
    model's weights and BatchNorm statistics as they were.

    Tolerance, from float32 arithmetic: ``||w_l||`` and ``||g_l||`` are sums of ``n`` squares
    (relative error at most ``(n + 1) u`` each, ``u`` = float32 epsilon), then a division, two
    products and the per-element product (``4 u``): ``(2 n + 6) u`` relative."""
    model, batch, recipe = setup("trades", torch.float32)
    x_adv = recipe.inputs(models_of(model), batch, ctx())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gamma = 5e-3
    v = weight_perturbation(model, lambda forward: recipe.objective(forward, batch, x_adv)[0], gamma)
    assert list(v) == perturbed_names(model) == ["body.0.weight", "body.4.weight"]
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())  # weights and BN buffers
    loss = recipe.objective(model, batch, x_adv)[0]
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if n in v])
    for (name, w), g in zip([(n, p) for n, p in model.named_parameters() if n in v], grads):
        n = w.numel()
        expected = gamma * w.detach().double().norm().item()
        assert abs(v[name].double().norm().item() - expected) <= (2 * n + 6) * EPS32 * expected, name
        cosine = F.cosine_similarity(v[name].flatten().double(), g.flatten().double(), dim=0).item()
        assert cosine == pytest.approx(1.0, abs=1e-5), name


def test_weights_come_back_after_the_step_but_for_the_optimizer_update():
    """Float32, plain SGD (lr 0.5): the step computed by hand at the perturbed weights,
    ``w0 - lr grad L(w0 + v)``, is what the weights are after restore, to the roundings of
    ``w <- w0 + ((w0 + v - lr g) - (w0 + v))``: three of them, ``3 u (|w0| + |v| + |lr g|)``
    element-wise. With lr 0 (the optimizer changes nothing) they come back bit for bit."""
    model, batch, recipe = setup("trades", torch.float32, "awp.gamma=0.05")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x_adv = recipe.inputs(models_of(copy.deepcopy(model)), batch, ctx())
    applied = {}
    apply = recipe.awp.apply
    recipe.awp.apply = lambda m, v: (applied.update(v), apply(m, v))

    hand = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    recipe.loss(models_of(model), batch, ctx())[0].backward()
    optimizer.step()
    recipe.after_step(models_of(model), batch, ctx())

    with torch.no_grad():
        for n, p in hand.named_parameters():
            if n in applied:
                p.add_(applied[n])
    recipe.objective(hand, batch, x_adv)[0].backward()
    for n, p in model.named_parameters():
        step = 0.5 * dict(hand.named_parameters())[n].grad
        v = applied.get(n, torch.zeros_like(p))
        tolerance = 3 * EPS32 * (w0[n].abs() + v.abs() + step.abs())
        assert ((p.detach() - (w0[n] - step)).abs() <= tolerance).all(), n
    assert set(applied) == {"body.0.weight", "body.4.weight"}

    still = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    recipe.loss(models_of(model), batch, ctx())[0].backward()
    frozen.step()
    recipe.after_step(models_of(model), batch, ctx())
    assert all(torch.equal(p, still[n]) for n, p in model.named_parameters())


def test_ranks_perturb_alike_with_the_gradient_averaged_over_their_shards():
    """Under torchrun each rank has half the batch: the proxy gradient is averaged over the ranks
    (one flat all-reduce) before the normalisation, so each rank's perturbation is the whole
    batch's (here without BatchNorm, whose batch statistics would differ per shard; float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x, y = torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))

    def loss_on(index):
        return lambda forward: F.cross_entropy(forward(x[index]), y[index])

    whole = weight_perturbation(model, loss_on(slice(None)), 0.01)
    shard_b = []
    weight_perturbation(model, loss_on(slice(8, None)), 0.01, all_mean=lambda flat: shard_b.append(flat) or flat)
    rank_a = weight_perturbation(model, loss_on(slice(0, 8)), 0.01, all_mean=lambda flat: (flat + shard_b[0]) / 2)
    for name in whole:
        torch.testing.assert_close(rank_a[name], whole[name], rtol=1e-12, atol=1e-15)


def test_gamma_zero_and_the_warmup_epochs_are_bitwise_the_plain_step(mnist16, tmp_path):
    """Through the engine on MNIST: awp.gamma=0 builds no perturbation; with gamma 0.01 and one
    warm-up epoch, the first epoch's weights equal the plain run's bit for bit, and the second
    epoch (perturbed) departs from them."""
    base = ["data.dataset=mnist", "data.image_size=16", "model.name=small_cnn", "model.hidden=16", "model.drop_rate=0",
            "at.batch_size=64", "optim.schedule=constant", "optim.lr=0.05", "device=cpu", "recipe=trades",
            "train_attack.eps=0.1", "train_attack.steps=2", "train_attack.step_size=0.05", "at.epochs=2",
            "train.log_every=1", f"data.root={mnist16[2]}", f"out_dir={tmp_path}"]
    data = TrainingData(take(mnist16[0], torch.arange(64), "mnist/train"), None, None)  # one step per epoch
    runs = {}
    for name, extra in (("plain", ["awp.gamma=0"]), ("awp", ["awp.gamma=0.01", "awp.warmup=1"])):
        trainer = Trainer(load_config(None, [*base, *extra]), data=data, progress=False)
        weights = []
        trainer.callbacks = (lambda s, m, t=trainer, w=weights: w.append([p.detach().clone() for p in t.model.parameters()])
                             if "loss" in m else None,)
        trainer.fit()
        runs[name] = (trainer, weights)
    assert runs["plain"][0].recipe.awp is None and runs["awp"][0].recipe.awp is not None
    (plain_1, plain_2), (awp_1, awp_2) = runs["plain"][1], runs["awp"][1]
    assert all(torch.equal(a, b) for a, b in zip(plain_1, awp_1))
    assert not all(torch.equal(a, b) for a, b in zip(plain_2, awp_2))
    assert WeightPerturbation(0.0).perturb(nn.Linear(2, 2), lambda f: torch.zeros(()), ctx()) is None


def test_bad_awp_settings_fail_before_any_work():
    with pytest.raises(ConfigError, match=r"awp\.gamma=-0\.1 is invalid"):
        load_config(None, ["recipe=trades", "awp.gamma=-0.1"])
    with pytest.raises(ConfigError, match="awp.gamma"):
        load_config(None, ["recipe=trades", f"awp.gamma={math.inf}"])
    with pytest.raises(ConfigError, match="awp.warmup"):
        load_config(None, ["recipe=trades", "awp.gamma=0.005", "awp.warmup=-1"])
    with pytest.raises(ConfigError, match=r"awp\.gamma=0\.005 with recipe 'mart'.*'ltd'.*'pgd_at'.*'trades'"):
        load_config(None, ["recipe=mart", "awp.gamma=0.005"])
    assert load_config(None, ["recipe=mart", "awp.gamma=0"]).awp.gamma == 0

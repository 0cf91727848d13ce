"""Standard adversarial training through the shared engine, on real MNIST (subsampled, 16x16,
a small CNN of width 16): every recipe learns, PGD-AT is more robust than natural training,
Free AT replays, Fast AT's early stop restores the previous epoch, bf16/fp16 autocast run on
the CPU, a killed run resumes exactly, a NaN keeps the last good checkpoint, and the CLI trains
and evaluates a plain classifier with the harness. Losses are cross-checked against
transcriptions of the TRADES and MART reference code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyBN, assert_same_parameters, kill_and_resume
from torch import nn

from metarobust.cli import main
from metarobust.config import DataConfig, OptimConfig
from metarobust.data.datasets import load_split
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError, DataError, TrainingDiverged
from metarobust.evaluation import evaluate_run
from metarobust.experiment import load_config
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.data import TrainingData, take
from metarobust.training.engine import Trainer
from metarobust.training.objectives import trades_kl
from metarobust.training.optim import lr_at
from metarobust.training.recipes import RECIPES, Models, StepContext, bn_mode, build_recipe
from metarobust.training.recipes.mart import boosted_ce, weighted_kl

MINE = ["natural", "pgd_at", "trades", "mart", "free_at", "fast_at", "backward_smoothing", "mixed_at"]

BASE = ["data.dataset=mnist", "data.image_size=16", "model.name=small_cnn", "model.hidden=16", "model.drop_rate=0",
        "at.batch_size=64", "optim.schedule=constant", "optim.lr=0.1", "device=cpu", "train_attack.eps=0.1",
        "train_attack.steps=2", "train_attack.step_size=0.05", "at.replays=2", "attack.eps=0.1", "attack.steps=10",
        "attack.step_size=0.025", "eval.checks=false"]


@pytest.fixture(scope="module")
def mnist(shared_data):
    root = shared_data / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST idx files not found in {root}")
    cfg = DataConfig(dataset="mnist", root=str(root), image_size=16)
    return load_split(cfg, "train"), load_split(cfg, "test"), str(root)


def data_of(mnist, start: int, count: int, test: int = 0) -> TrainingData:
    train, test_store, _ = mnist
    return TrainingData(take(train, torch.arange(start, start + count), "mnist/train"), None,
                        take(test_store, torch.arange(test), "mnist/test") if test else None)


def config(mnist, tmp_path, *extra):
    return load_config(None, [*BASE, f"data.root={mnist[2]}", f"out_dir={tmp_path}", *extra])


def train_logged(cfg, data, run=None, **kw):
    losses = []
    trainer = Trainer(cfg, run, data=data, progress=False,
                              callbacks=(lambda s, m: losses.append(m["loss"]) if "loss" in m else None,), **kw)
    trainer.fit()
    return trainer, losses


@pytest.fixture(scope="module")
def natural_run(mnist, tmp_path_factory):
    """Natural training, 3 epochs of 2048 images (96 steps), in a run folder: the baseline of the
    robustness comparison and the starting point the recipes fine-tune from."""
    out = tmp_path_factory.mktemp("natural")
    cfg = config(mnist, out, "recipe=natural", "name=natural", "at.epochs=3", "train.log_every=32")
    run = RunDir(cfg, tensorboard=False)
    trainer, losses = train_logged(cfg, data_of(mnist, 0, 2048), run)
    run.close()
    return trainer.model.eval(), out / "natural", losses


def test_standard_recipes_are_registered_with_their_kind(capsys):
    assert main(["list", "recipes"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert set(MINE) <= listed
    assert all(RECIPES.get(r).evaluation == "classifier" and not RECIPES.get(r).episodic for r in MINE)
    assert RECIPES.get("maml").episodic and RECIPES.get("r_maml").evaluation == "fewshot"
    assert getattr(RECIPES.get("pgd_at"), "attack_bn") == "train"
    assert {r: RECIPES.get(r).attack_bn for r in ("trades", "mart", "backward_smoothing")} == \
        {"trades": "eval", "mart": "eval", "backward_smoothing": "eval"}


@pytest.mark.parametrize("recipe", MINE)
def test_each_recipe_lowers_its_loss_fine_tuning_a_natural_model(mnist, natural_run, tmp_path, recipe):
    """12 steps from the naturally trained model (at.init): the recipe's own (adversarial) loss
    over the last 6 steps is below that of the first 6."""
    cfg = config(mnist, tmp_path, f"recipe={recipe}", f"at.init={natural_run[1]}", "at.epochs=2",
                 "train.log_every=6", "optim.lr=0.05")
    _, losses = train_logged(cfg, data_of(mnist, 2048, 384))
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[1] < losses[0] - 0.05, losses


def test_pgd_at_is_more_robust_than_natural_training_under_pgd(mnist, natural_run, tmp_path):
    """Same data, model and budget (96 steps); scored by the harness under PGD-10 at eps 0.1 on
    500 test images: natural training is broken (measured 7%), PGD-AT keeps a third (34%)."""
    natural, _, _ = natural_run
    cfg = config(mnist, tmp_path, "recipe=pgd_at", "at.epochs=3", "eval.points=500", "train.log_every=32")
    data = data_of(mnist, 0, 2048, test=500)
    trainer, _ = train_logged(cfg, data)
    robust_at = evaluate_run(cfg, trainer.model.eval(), data.test).as_dict()
    robust_nat = evaluate_run(cfg, natural, data.test).as_dict()
    assert robust_at["points"] == 500
    assert robust_at["robust_acc"] > robust_nat["robust_acc"] + 0.15, (robust_at, robust_nat)
    assert robust_nat["clean_acc"] > 0.4  # the baseline did learn


def test_free_at_replays_each_batch_m_times_with_a_persistent_perturbation(mnist, tmp_path):
    cfg = config(mnist, tmp_path, "recipe=free_at", "at.replays=3", "at.epochs=1", "train.log_every=1",
                 "optim.schedule=cyclic", "optim.lr=0.1")
    trainer = Trainer(cfg, data=data_of(mnist, 0, 128), progress=False)  # 2 batches
    seen, deltas, lrs = [], [], []
    loss_fn = trainer.recipe.loss

    def spy(models, batch, ctx):
        seen.append((ctx.replay, batch.index.clone()))
        delta = trainer.recipe.delta
        deltas.append(torch.zeros_like(batch.x) if delta is None else delta.clone())
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return loss_fn(models, batch, ctx)

    trainer.recipe.loss = spy
    trainer.fit()
    assert [r for r, _ in seen] == [0, 1, 2, 0, 1, 2]
    assert all(torch.equal(seen[0][1], idx) for _, idx in seen[:3])  # one batch, three replays
    assert not torch.equal(seen[0][1], seen[3][1])
    assert deltas[0].abs().max() == 0  # starts at zero...
    assert deltas[3].abs().max() > 0  # ...and the next batch starts from the last replay's delta
    assert deltas[3].abs().max() <= cfg.train_attack.eps + 1e-6
    # The cyclic schedule counts replays: six distinct lrs rising to the peak at 1/2 and back.
    expected = [lr_at(trainer.optim, (b + (r + 1) / 3) / 2, cfg.at.epochs) for b in range(2) for r in range(3)]
    assert lrs == pytest.approx(expected) and len(set(lrs)) == 6


def test_fast_at_early_stop_restores_the_previous_epoch_on_a_collapse(mnist, tmp_path):
    """A fabricated catastrophic overfitting: the check's PGD accuracy goes 0.5, 0.6, then 0.1
    (a drop > 0.2) after epoch 3: training stops and the weights of epoch 2 come back."""
    cfg = config(mnist, tmp_path, "recipe=fast_at", "at.epochs=5", "train.log_every=2", "at.holdout=0")
    trainer = Trainer(cfg, data=data_of(mnist, 0, 128), progress=False)  # 2 steps per epoch
    accuracies = iter([0.5, 0.6, 0.1, 0.9, 0.9])
    trainer.recipe.check_accuracy = lambda t: next(accuracies)
    weights = {}

    def snapshot(step, metrics):
        if "loss" in metrics:  # logged before the epoch-end hook of the same step
            weights[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer.callbacks = (snapshot,)
    trainer.fit()
    assert trainer.step_count == 6 and trainer.stopped and "catastrophic" in trainer.stopped
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], weights[4][k]) for k in final)
    assert any(not torch.equal(final[k], weights[6][k]) for k in final)


def test_fast_at_check_measures_pgd_accuracy_on_the_holdout(mnist, natural_run, tmp_path):
    cfg = config(mnist, tmp_path, "recipe=fast_at", "at.epochs=1", "at.holdout=64", "optim.lr=0.001",
                 f"at.init={natural_run[1]}")
    train, _, _ = mnist
    data = TrainingData(take(train, torch.arange(64), "t"), take(train, torch.arange(3000, 3064), "h"), None)
    trainer = Trainer(cfg, data=data, progress=False)
    batch = trainer.check_batch()
    assert batch.x.shape == (64, 1, 16, 16) and torch.equal(batch.y, data.holdout.labels)
    trainer.fit()  # one epoch: a real check, logged
    acc = trainer.recipe.check_accuracy(trainer)
    with torch.no_grad():
        clean = (trainer.model.eval()(batch.x).argmax(1) == batch.y).float().mean().item()
    assert 0 <= acc < clean  # the natural start is not robust: PGD-5 at eps 0.1 breaks points


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_train_on_cpu(mnist, tmp_path, amp):
    cfg = config(mnist, tmp_path, "recipe=trades", f"at.amp={amp}", "at.channels_last=true", "at.epochs=1",
                 "train.log_every=1")
    trainer, losses = train_logged(cfg, data_of(mnist, 0, 128))
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    assert trainer.first_batch.x.is_contiguous(memory_format=torch.channels_last)
    conv = [m for m in trainer.model.modules() if isinstance(m, nn.Conv2d)][-1]  # C_in > 1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_killed_standard_run_resumes_to_the_same_parameters(mnist, tmp_path):
    """Fast AT (attack noise, epoch hooks with a best-weights snapshot, the check batch) with flip
    augmentation (its generator): killed after step 5 (checkpoint at 3), resumed, it ends with
    exactly the parameters and metrics of an uninterrupted run."""
    common = ["recipe=fast_at", "at.epochs=2", "at.augment=flip", "train.log_every=1", "train.checkpoint_every=3",
              "at.holdout=0"]
    data = data_of(mnist, 0, 256)  # 4 steps per epoch
    whole, resumed, whole_run, run = kill_and_resume(
        lambda name: config(mnist, tmp_path, *common, f"name={name}"), data, kill_at=5, checkpoint_at=3)
    assert_same_parameters(whole.model, resumed.model)
    assert whole_run.metrics() == run.metrics()


def test_nan_stops_standard_training_and_keeps_the_last_good_checkpoint(mnist, tmp_path):
    cfg = config(mnist, tmp_path, "recipe=pgd_at", "at.epochs=1", "train.log_every=1", "train.checkpoint_every=2",
                 "name=nan")
    run = RunDir(cfg, tensorboard=False)
    trainer = Trainer(cfg, run, data=data_of(mnist, 0, 384), progress=False)

    def poison(step, metrics):
        if step == 3:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    trainer.callbacks = (poison,)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    state = load_checkpoint(run.path)
    assert state["step"] == 2 and state["recipe_name"] == "pgd_at"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_trains_and_evaluates_a_plain_classifier(mnist, tmp_path, capsys):
    overrides = [*BASE, f"data.root={mnist[2]}", f"out_dir={tmp_path}", "name=cli", "at.train_size=256",
                 "at.epochs=1", "eval.points=128", "train.log_every=2"]
    assert main(["train", "configs/at/mnist_pgd_at.yaml", *overrides, "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["recipe"] == "pgd_at" and out["points"] == 128 and 0 <= out["robust_acc"] <= out["clean_acc"]
    run = tmp_path / "cli"
    for name in ("config.yaml", "metrics.jsonl", "report.md", "eval.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert main(["eval", str(run), "attack.eps=0.0", "eval.points=64", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["points"] == 64 and out["robust_acc"] == pytest.approx(out["clean_acc"])
    # A huge eps with the travel to use it (the harness's large-eps check: 20 steps of eps / 8).
    # PGD-10 at step 0.025 moves at most 0.25 from its random start: on this barely trained,
    # nearly constant model a few of the 64 points survive it, depending on the draw.
    assert main(["eval", str(run), "attack.eps=0.5", "attack.steps=20", "attack.step_size=0.0625",
                 "eval.points=64", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["robust_acc"] < 0.05  # a huge eps breaks every point


def test_bad_standard_settings_fail_before_any_work(mnist, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="at.amp"):
        config(mnist, tmp_path, "recipe=pgd_at", "at.amp=fp8")
    with pytest.raises(ConfigError, match="optim.milestones"):
        config(mnist, tmp_path, "recipe=pgd_at", "optim.schedule=piecewise", "at.epochs=10", "optim.milestones=[20]")
    with pytest.raises(ConfigError, match="at.init"):
        config(mnist, tmp_path, "recipe=pgd_at", f"at.init={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="GradScaler"):  # meta-gradients are accumulated task by task
        config(mnist, tmp_path, "recipe=maml", "at.amp=fp16")
    with pytest.raises(ConfigError, match="at.batch_size"):
        Trainer(config(mnist, tmp_path, "recipe=natural", "at.batch_size=128"), data=data_of(mnist, 0, 64),
                        progress=False)
    # A few-shot class split (glyphs, Omniglot: other classes at test) cannot train a classifier.
    from metarobust.training import data as data_module

    train, test, _ = mnist
    other = take(test, torch.arange(8), "other/test")
    other.class_names = [f"other{i}" for i in range(10)]
    monkeypatch.setattr(data_module, "load_split", lambda cfg, split: train if split == "train" else other)
    cfg = config(mnist, tmp_path, "recipe=natural")
    with pytest.raises(DataError, match="different classes"):
        data_module.load_training_data(cfg, build_recipe(cfg), torch.device("cpu"))


def test_lr_schedules_follow_the_papers():
    # Wong et al.'s CIFAR-10 scripts (train_fgsm.py, train_free.py): torch's CyclicLR from 0 to
    # lr_max with step_size_up = step_size_down = lr_steps / 2, stepped every iteration
    cyclic = OptimConfig(schedule="cyclic", lr=0.2)
    iterations = 15 * 20
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=0.2, momentum=0.9)
    reference = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2, step_size_up=iterations / 2,
                                                  step_size_down=iterations / 2)
    theirs = []
    for _ in range(iterations + 1):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    ours = [lr_at(cyclic, 15 * i / iterations, 15) for i in range(iterations + 1)]
    assert ours == pytest.approx(theirs, abs=1e-12)
    # Their MNIST script: lambda t: np.interp([t], [0, epochs * 2 // 5, epochs], [0, lr_max, 0])
    mnist = OptimConfig(schedule="cyclic", lr=0.2, cyclic_peak=0.4)
    ts = np.linspace(0, 15, 31)
    assert [lr_at(mnist, t, 15) for t in ts] == pytest.approx(np.interp(ts, [0, 6, 15], [0, 0.2, 0]).tolist())
    piecewise = OptimConfig(schedule="piecewise", lr=0.1, milestones=[100, 150])
    assert [lr_at(piecewise, t, 200) for t in (0, 99.9, 100, 149.9, 150, 200)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cosine = OptimConfig(schedule="cosine", lr=0.1)
    assert [lr_at(cosine, t, 10) for t in (0, 5, 10)] == pytest.approx([0.1, 0.05, 0.0])


@pytest.mark.parametrize("recipe", ["maml", "natural"])
def test_any_recipe_takes_any_optimizer_and_schedule(recipe, mnist, tmp_path):
    """The meta recipe on SGD with a cosine schedule, the plain one on Adam with a cyclic one: the
    optimizer is the config's and the learning rate follows the schedule at every step."""
    name, schedule = ("sgd", "cosine") if recipe == "maml" else ("adam", "cyclic")
    extra = ["optim.momentum=0.9"] if name == "sgd" else []
    cfg = config(mnist, tmp_path, f"recipe={recipe}", f"optim.name={name}", f"optim.schedule={schedule}",
                 "optim.lr=0.01", "at.epochs=2", "at.batch_size=32", "train.iterations=4", "meta.queries=2", "train.log_every=1",
                 "meta.inner_steps=1", *extra)
    trainer = Trainer(cfg, data=data_of(mnist, 0, 64), progress=False)
    assert type(trainer.optimizer).__name__ == {"sgd": "SGD", "adam": "Adam"}[name]
    lrs = []
    trainer.callbacks = (lambda step, metrics: lrs.append(metrics["lr"]) if "lr" in metrics else None,)
    trainer.fit()
    total = trainer.total_steps / trainer.steps_per_epoch
    per_epoch = trainer.steps_per_epoch
    assert lrs == pytest.approx([lr_at(trainer.optim, s / per_epoch, total) for s in range(1, trainer.total_steps + 1)])
    assert len(set(lrs)) > 1


def test_optimizer_combinations_that_cannot_work_fail_before_any_work(mnist, tmp_path):
    with pytest.raises(ConfigError, match="optim.name=adam takes no optim.momentum"):
        config(mnist, tmp_path, "recipe=natural", "optim.name=adam", "optim.momentum=0.9")
    with pytest.raises(ConfigError, match="optim.milestones"):  # meta-learning counts meta-updates
        config(mnist, tmp_path, "recipe=maml", "optim.schedule=piecewise", "optim.milestones=[10]",
               "train.iterations=5")
    with pytest.raises(ConfigError, match="moved in metarobust 0.2; write 'optim.lr'"):
        config(mnist, tmp_path, "recipe=natural", "at.lr=0.1")


# -- the objectives against transcriptions of the reference code ----------------------------------

def reference_trades(model, x, y, noise, step_size, eps, steps, beta):
    """``trades_loss`` of yaodongyu/TRADES (trades.py), transcribed, with the start noise given."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = x.detach() + 0.001 * noise
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
    return loss_natural + beta * loss_robust


def test_trades_loss_equals_the_reference_code():
    torch.manual_seed(0)
    model = TinyBN().double()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 0.98 + 0.01  # off the box: the start is not clipped there
    y = torch.randint(0, 5, (16,))
    cfg = load_config(None, ["recipe=trades", "train_attack.eps=0.031", "train_attack.step_size=0.007",
                             "train_attack.steps=3", "at.beta=6"])
    recipe = build_recipe(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    expected = reference_trades(model, x, y, noise, 0.007, 0.031, 3, 6.0)
    model.load_state_dict(state)
    model.train()
    models = Models({"model": model}, {"model": model}, {"model": model}, ["model"])
    ctx = StepContext(0, 0, 0.0, 0, torch.Generator().manual_seed(1), 5)
    got, stats = recipe.loss(models, EpisodeBatch.plain(x, y, torch.arange(16)), ctx)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    assert set(stats) == {"clean_acc", "adv_acc", "kl"}


def test_mixed_at_is_goodfellows_objective_with_fgsm():
    """The worked example of docs/architecture.md: alpha CE(x) + (1 - alpha) CE(x + eps sign grad),
    written out with plain autograd (FGSM: one step of eps from the clean input, clipped to [0, 1])."""
    torch.manual_seed(0)
    model = TinyBN().double().train()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    cfg = load_config(None, ["recipe=mixed_at", "train_attack.name=fgsm", "train_attack.eps=0.1", "mixed_at.alpha=0.3"])
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    x_adv = (x + 0.1 * g.sign()).clamp(0, 1)
    expected = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(model(x_adv), y)
    models = Models({"model": model}, {"model": model}, {"model": model}, ["model"])
    ctx = StepContext(0, 0, 0.0, 0, torch.Generator().manual_seed(1), 5)
    got, stats = build_recipe(cfg).loss(models, EpisodeBatch.plain(x, y, torch.arange(16)), ctx)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert set(stats) == {"clean_acc", "adv_acc"}
    with pytest.raises(ConfigError, match="mixed_at.alpha"):
        load_config(None, ["recipe=mixed_at", "mixed_at.alpha=1.5"])


def test_mart_terms_equal_the_reference_code():
    torch.manual_seed(0)
    logits, logits_adv = torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (32,))
    # mart_loss of YisenWang/MART (mart.py), transcribed
    kl = nn.KLDivLoss(reduction="none")
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    loss_robust = (1.0 / 32) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    assert boosted_ce(logits_adv, y).item() == pytest.approx(loss_adv.item(), rel=1e-12)
    assert weighted_kl(logits, logits_adv, y).item() == pytest.approx(loss_robust.item(), rel=1e-9)
    # and TRADES' KL is the batch mean of KL(p(x) || p(x'))
    ref = nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, 1), F.softmax(logits, 1)) / 32
    assert trades_kl(logits, logits_adv).item() == pytest.approx(ref.item(), rel=1e-9)


def test_attacks_run_in_the_recipes_batchnorm_mode_and_restore_train_mode():
    model = TinyBN()
    model.train()
    modes = []
    model.body[1].register_forward_pre_hook(lambda m, i: modes.append(m.training))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,))
    for recipe, expected in (("trades", False), ("pgd_at", True)):
        modes.clear()
        r = build_recipe(load_config(None, [f"recipe={recipe}", "train_attack.steps=2"]))
        attack = r.train_attack()
        r.attack(model, attack, x, y, noise=attack.init_noise(x, torch.Generator().manual_seed(0)))
        assert modes and all(m is expected for m in modes), recipe
        assert model.training
    r = build_recipe(load_config(None, ["recipe=trades", "at.attack_bn=train"]))
    assert r.bn == "train"
    with bn_mode(model, "eval"):
        assert not model.training
    assert model.training


def test_attacks_differentiate_only_the_input_and_leave_the_weights_trainable():
    """``Recipe.attack`` runs with the weights frozen (so a compiled backward skips their
    gradients), gives them no gradient, and restores ``requires_grad``; a frozen parameter stays
    frozen."""
    model = TinyBN().train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    during = []
    model.body[1].register_forward_pre_hook(lambda m, i: during.append([p.requires_grad for p in model.parameters()]))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,))
    r = build_recipe(load_config(None, ["recipe=pgd_at", "train_attack.steps=2"]))
    attack = r.train_attack()
    x_adv = r.attack(model, attack, x, y, noise=attack.init_noise(x, torch.Generator().manual_seed(0)))
    assert during and not any(any(step) for step in during)
    assert not torch.equal(x_adv, x)  # the input gradient was there
    assert all(p.grad is None for p in model.parameters())
    assert not frozen.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])

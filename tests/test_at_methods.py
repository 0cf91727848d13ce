"""The seven method recipes of issue 4 (MAT, LTD, AdvProp, adversarial fine-tuning, local balls,
BAT, FRL) on real MNIST (subsampled, 16x16, small models), each asserting what makes the method
itself: MAT's peers train on each other's adversarial examples (and the multi-perturbation
variant is scored on the union), LTD's student targets are the frozen teacher's tempered soft
labels, AdvProp's main BatchNorms only ever see clean batches, FRL's class weights and radii
move toward the worst class of the validation split, and BAT / local balls / fine-tuning lower
their objective with their own term active."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_parameters, kill_and_resume

from metarobust.attacks import threat
from metarobust.attacks.pgd import PGD
from metarobust.config import to_dict
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.evaluation import evaluate_run
from metarobust.experiment import load_config, model_from_state
from metarobust.models import build_model
from metarobust.models.dual_bn import DualBatchNorm, bn_route, dual_bn_layers
from metarobust.runs import load_checkpoint
from metarobust.training.data import TrainingData, take
from metarobust.training.engine import Trainer
from metarobust.training.recipes import StepContext, bn_mode, build_recipe
from metarobust.training.recipes.adversarial_finetune import ramped_eps
from metarobust.training.recipes.bat import boundary_points
from metarobust.training.recipes.frl import class_weights, normalize_multipliers

BASE = ["data.dataset=mnist", "data.image_size=16", "model.name=small_cnn", "model.hidden=16",
        "model.drop_rate=0", "at.batch_size=32", "optim.schedule=constant", "optim.lr=0.05", "device=cpu",
        "train_attack.eps=0.1", "train_attack.steps=3", "train_attack.step_size=0.04", "train.log_every=1",
        "train.checkpoint_every=1000", "attack.eps=0.1", "attack.steps=3", "attack.step_size=0.04",
        "eval.checks=false"]
SHAPE = {"in_channels": 1, "num_classes": 10, "image_size": 16}
"""The data shape a checkpoint of these tests is rebuilt with."""


@pytest.fixture(scope="module")
def mnist(mnist16):
    return mnist16


def data_of(mnist, count: int, holdout: int = 0) -> TrainingData:
    train = mnist[0]
    held = take(train, torch.arange(count, count + holdout), "mnist/holdout") if holdout else None
    return TrainingData(take(train, torch.arange(count), "mnist/train"), held, None)


def config(mnist, tmp_path, *extra):
    return load_config(None, [*BASE, f"data.root={mnist[2]}", f"out_dir={tmp_path}", *extra])


def trainer_of(cfg, data) -> Trainer:
    return Trainer(cfg, None, data=data, progress=False)


def fixed_batch(data: TrainingData, n: int = 32) -> EpisodeBatch:
    x = data.train.images[:n].float() / 255
    return EpisodeBatch.plain(x, data.train.labels[:n], torch.arange(n))


def objective(trainer: Trainer, batch: EpisodeBatch, progress: float = 1.0) -> dict[str, float]:
    """The recipe's loss and statistics on ``batch`` with a fixed attack seed (no update)."""
    generator = torch.Generator().manual_seed(1234)
    ctx = StepContext(0, 0, progress, 0, generator, trainer.num_classes)
    loss, stats = trainer.recipe.loss(trainer.models, batch, ctx)
    return {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}


@pytest.fixture(scope="module")
def natural_checkpoint(mnist, tmp_path_factory):
    """A naturally trained small CNN (4 epochs of 2048 images, ~87% test accuracy, ~2 s), saved as
    a checkpoint: LTD's teacher, the starting point of fine-tuning, FRL, BAT and local balls."""
    out = tmp_path_factory.mktemp("natural")
    cfg = config(mnist, out, "recipe=natural", "at.epochs=4", "train.log_every=64")
    trainer = trainer_of(cfg, data_of(mnist, 2048))
    trainer.fit()
    path = out / "natural.pt"
    torch.save({"model": trainer.model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def recording_attacks(trainer: Trainer) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Wrap the recipe's attack: record ``(role attacked, input, output)`` of every call."""
    log = []
    names = {id(m): name for name, m in trainer.models.raw.items()}
    inner = trainer.recipe.attack

    def attack(model, *args, **kw):
        out = inner(model, *args, **kw)
        log.append((names.get(id(model), names.get(id(getattr(model, "module", None)))), args[1], out))
        return out

    trainer.recipe.attack = attack
    return log


# -- MAT ---------------------------------------------------------------------------------------------

def test_mat_peers_train_on_each_others_adversarial_examples(mnist, tmp_path):
    cfg = config(mnist, tmp_path, "recipe=mat", "mat.peers=3", "at.epochs=1")
    trainer = trainer_of(cfg, data_of(mnist, 96))
    assert trainer.models.trainable == ["model", "peer1", "peer2"]
    attacks = recording_attacks(trainer)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in trainer.models.trainable}
    for name in seen:  # the training forwards (train mode; the attacks run in eval mode)
        trainer.models.modules[name].register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].detach()) if m.training else None)
    trainer.train_step()
    own = {name: x_adv for name, _, x_adv in attacks}
    assert list(own) == ["model", "peer1", "peer2"]  # every peer attacked itself, once
    assert not torch.equal(own["model"], own["peer1"])  # distinct models, distinct examples
    pool = torch.cat(list(own.values()))
    for name, inputs in seen.items():  # one forward per peer, of every peer's adversarial examples
        assert len(inputs) == 1 and torch.equal(inputs[0], pool), name
    # The distillation is live. Zero-initialised heads make every peer uniform at first (nothing to
    # teach); after a few steps the peers disagree, and with alpha = 1 (distillation alone) every
    # peer still receives a gradient: from its peers' predictions on the pooled examples.
    trainer.fit()
    trainer.recipe.alpha = 1.0
    trainer.optimizer.zero_grad()
    loss, stats = trainer.recipe.loss(trainer.models, fixed_batch(trainer.data),
                                      StepContext(3, 0, 1.0, 0, torch.Generator().manual_seed(0), 10))
    loss.backward()
    assert float(stats["kd"]) > 0
    for name in trainer.models.trainable:
        grads = [p.grad for p in trainer.models.modules[name].parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), name


def test_multi_perturbation_mat_has_specialists_a_generalist_and_a_union_score(mnist, tmp_path):
    cfg = config(mnist, tmp_path, "recipe=mat", "mat.norms=[linf,l2]", "mat.eps={linf: 0.1, l2: 1.0}",
                 "at.epochs=1", "eval.union={l2: 1.0}", "eval.points=48")
    trainer = trainer_of(cfg, data_of(mnist, 64))
    assert trainer.models.trainable == ["model", "specialist_linf", "specialist_l2"]
    attacks = recording_attacks(trainer)
    trainer.train_step()
    by_role: dict[str, list[torch.Tensor]] = {}
    for name, x, x_adv in attacks:
        by_role.setdefault(name, []).append(x_adv - x)
    assert [len(by_role[r]) for r in ("model", "specialist_linf", "specialist_l2")] == [2, 1, 1]
    linf = threat.lp_norm(by_role["specialist_linf"][0], "linf")
    l2 = threat.lp_norm(by_role["specialist_l2"][0], "l2")
    assert float(linf.max()) <= 0.1 + 1e-6 and float(l2.max()) <= 1.0 + 1e-5
    assert float(threat.lp_norm(by_role["specialist_l2"][0], "linf").max()) > 0.1  # a real L2 example
    test = take(mnist[1], torch.arange(48), "mnist/test")
    summary = evaluate_run(cfg, trainer.model.eval(), test).as_dict()
    assert {k.split("/")[0] for k in summary["after"]} == {"linf", "l2"}
    assert summary["robust_acc"] <= min(summary["after"].values()) + 1e-9


def test_mat_rejects_a_single_model_and_identical_starts(mnist, tmp_path):
    with pytest.raises(ConfigError, match="mat.norms"):
        config(mnist, tmp_path, "recipe=mat", "mat.norms=[l2]", "mat.generalist=false")
    with pytest.raises(ConfigError, match="at.init"):
        config(mnist, tmp_path, "recipe=mat", "at.init=runs/x")
    with pytest.raises(ConfigError, match="mat.models"):
        config(mnist, tmp_path, "recipe=mat", "mat.models=[small_cnn,small_cnn]")


# -- LTD ---------------------------------------------------------------------------------------------

def test_ltd_student_targets_are_the_frozen_teachers_tempered_soft_labels(mnist, tmp_path,
                                                                          natural_checkpoint):
    cfg = config(mnist, tmp_path, "recipe=ltd", f"ltd.teacher={natural_checkpoint}", "model.hidden=8",
                 "ltd.teacher_temperature=0.5", "ltd.student_temperature=2.0", "at.beta=0",
                 "at.epochs=1")
    data = data_of(mnist, 64)
    trainer = trainer_of(cfg, data)
    teacher = trainer.models.modules["teacher"]
    saved = load_checkpoint(natural_checkpoint)
    reference = model_from_state(load_config(None, [*BASE, f"data.root={mnist[2]}"]),
                                          {**saved, "data": SHAPE})
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in reference.parameters())
    trainer.fit()  # two steps
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in reference.state_dict().items():  # frozen: still the checkpoint's weights
        assert torch.equal(teacher.state_dict()[name], value), name
    batch = fixed_batch(data)
    q = trainer.recipe.soft_labels(trainer.models, batch.x)
    with torch.no_grad():
        expected = F.softmax(reference(batch.x) / 0.5, dim=-1)
    torch.testing.assert_close(q, expected)
    assert float(q.max(dim=-1).values.min()) < 1.0  # soft, not one-hot
    # With beta = 0 the loss is exactly the soft cross-entropy to q at the student's temperature.
    stats = objective(trainer, batch)
    with torch.no_grad():
        student = trainer.models.modules["model"]
        soft_ce = -(expected * F.log_softmax(student(batch.x) / 2.0, dim=-1)).sum(-1).mean()
    assert stats["loss"] == pytest.approx(float(soft_ce), rel=1e-5)
    # The deployed student carries its temperature: its logits are f_S / tau_S.
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(batch.x), student(batch.x) / 2.0)


def test_ltd_needs_a_teacher_that_exists(mnist, tmp_path):
    with pytest.raises(ConfigError, match="ltd.teacher='.*nope.pt' is not a run folder"):
        config(mnist, tmp_path, "recipe=ltd", f"ltd.teacher={tmp_path / 'nope.pt'}")
    cfg = config(mnist, tmp_path, "recipe=ltd")  # loads (shipped configs name no teacher) ...
    with pytest.raises(ConfigError, match="ltd.teacher is not set"):
        build_recipe(cfg)  # ... but fails before any work: metarobust train builds the recipe first


# -- AdvProp -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attack_bn", ["eval", "train"])
def test_advprop_main_batchnorms_only_ever_see_clean_batches(mnist, tmp_path, attack_bn):
    cfg = config(mnist, tmp_path, "recipe=advprop", "model.name=conv4", "model.batch_norm=running",
                 "model.hidden=8", f"at.attack_bn={attack_bn}", "at.epochs=1")
    trainer = trainer_of(cfg, data_of(mnist, 64))
    module = trainer.models.modules["model"]
    layers = dual_bn_layers(module)
    assert len(layers) == 4
    before = copy.deepcopy(module)
    trainer.train_step()
    x = trainer.first_batch.x
    # Replay: the pre-step model fed only the clean batch, main route, train mode.
    with bn_route(before, "main"), bn_mode(before, "train"), torch.no_grad():
        before(x)
    for trained, replay in zip(layers, dual_bn_layers(before)):
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(trained.main, buffer), getattr(replay.main, buffer))
        assert not torch.allclose(trained.aux.running_mean, trained.main.running_mean)  # aux saw x_adv
    updates = int(layers[0].aux.num_batches_tracked)
    # Attack-time forwards in train mode update the aux statistics only.
    assert updates == (1 if attack_bn == "eval" else 1 + cfg.train_attack.steps)
    deployed = trainer.model
    assert not any(isinstance(m, DualBatchNorm) for m in deployed.modules())
    plain = build_model(cfg.model, 1, 10, 16, "mnist")
    plain.load_state_dict(deployed.state_dict())  # the deployed model is the plain architecture
    assert torch.equal(plain.state_dict()[next(k for k in plain.state_dict() if "running_mean" in k)],
                       layers[0].main.running_mean)


def test_advprop_needs_batchnorm(mnist, tmp_path):
    with pytest.raises(ConfigError, match="model.batch_norm"):
        config(mnist, tmp_path, "recipe=advprop")  # the small CNN has no BatchNorm


# -- Adversarial fine-tuning (Hou et al.) -----------------------------------------------------------

def test_adversarial_finetune_starts_at_f0_ramps_eps_and_distils(mnist, tmp_path, natural_checkpoint):
    extra = ["recipe=adversarial_finetune", f"at.init={natural_checkpoint}", "at.epochs=3", "optim.lr=0.02",
             "finetune.eps_ramp=0.5"]
    data = data_of(mnist, 64)
    batch = fixed_batch(data)
    kls = {}
    for weight in (0.0, 5.0):
        cfg = config(mnist, tmp_path, *extra, f"finetune.distill_weight={weight}")
        trainer = trainer_of(cfg, data)
        reference = trainer.models.modules["reference"]
        start_weights = trainer.models.modules["model"].state_dict()
        for (name, a), b in zip(start_weights.items(), reference.state_dict().values()):
            assert torch.equal(a, b), name  # both start at f_0
        first = objective(trainer, batch, progress=0.0)
        assert first["distill_kl"] == pytest.approx(0.0, abs=1e-6) and first["eps"] == 0.0
        eps_seen = []
        trainer.callbacks = (lambda s, m: eps_seen.append(m["eps"]) if "eps" in m else None,)
        start = objective(trainer, batch)
        trainer.fit()
        end = objective(trainer, batch)
        assert eps_seen == sorted(eps_seen) and eps_seen[0] < eps_seen[-1] == pytest.approx(0.1)
        assert end["adv_ce"] < start["adv_ce"]  # the loss at full eps falls
        kls[weight] = end["distill_kl"]
        assert not any(p.requires_grad for p in reference.parameters())
    assert 0 < kls[5.0] < kls[0.0]  # the distillation term holds the model near f_0
    assert ramped_eps(0.3, 0.25, 0.5) == pytest.approx(0.15) and ramped_eps(0.3, 0.25, 0.0) == 0.3


def test_adversarial_finetune_needs_f0(mnist, tmp_path):
    with pytest.raises(ConfigError, match="at.init is not set"):
        build_recipe(config(mnist, tmp_path, "recipe=adversarial_finetune"))
    with pytest.raises(ConfigError, match="finetune.aux_bn"):
        config(mnist, tmp_path, "recipe=adversarial_finetune", "finetune.aux_bn=true")  # no BN to double


# -- Local balls (Lu & Kumar) ------------------------------------------------------------------------

def test_local_balls_attacks_around_the_weak_adversary_and_learns(mnist, tmp_path, natural_checkpoint):
    cfg = config(mnist, tmp_path, "recipe=local_balls", f"at.init={natural_checkpoint}",
                 "train_attack.steps=1", "train_attack.step_size=0.125", "local_balls.radius=0.25",
                 "at.epochs=4")
    data = data_of(mnist, 128)
    trainer = trainer_of(cfg, data)
    batch = fixed_batch(data)
    attacks = recording_attacks(trainer)
    start = objective(trainer, batch)
    (_, x, x_adv), (_, seed, x_local) = attacks[:2]
    assert torch.equal(seed, x_adv)  # the second stage starts from the weak adversary
    r = 0.25 * 0.1
    moved = threat.lp_norm(x_local - x_adv, "linf")
    assert float(moved.max()) <= r + 1e-6 and float(moved.mean()) > r / 2
    assert float(threat.lp_norm(x_local - x, "linf").max()) > 0.1  # beyond the eps-ball: a local ball
    assert start["local_ce"] > 0 and start["global_kl"] > 0
    trainer.recipe.attack = type(trainer.recipe).attack.__get__(trainer.recipe)
    trainer.fit()
    end = objective(trainer, batch)
    assert end["loss"] < start["loss"] and end["local_ce"] < start["local_ce"]


# -- BAT ---------------------------------------------------------------------------------------------

def test_bat_boundary_points_bracket_the_decision_boundary(mnist, natural_checkpoint):
    cfg = load_config(None, [*BASE, f"data.root={mnist[2]}"])
    model = model_from_state(cfg, {**load_checkpoint(natural_checkpoint), "data": SHAPE})
    x = mnist[1].images[:64].float() / 255
    y = mnist[1].labels[:64]
    with torch.no_grad():
        target = F.log_softmax(model(x), dim=-1)
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    points = boundary_points(model, x, y, target, start, eps=0.2, step_size=0.04, steps=10, tau=1)
    with torch.no_grad():
        correct_start = model(x).argmax(-1) == y
        lc_ok = model(points.last_clean).argmax(-1) == y
        fa_ok = model(points.first_adv).argmax(-1) == y
    assert 0 < int(points.flipped.sum()) and 0 < int(points.stopped.sum())
    assert bool(lc_ok[correct_start].all())  # the last-clean point is still classified correctly
    assert not bool(fa_ok[points.stopped].any())  # a stopped first-adversarial point is misclassified
    assert bool((points.stopped <= points.flipped).all())
    for p in (points.last_clean, points.first_adv):
        assert float(threat.lp_norm(p - x, "linf").max()) <= 0.2 + 1e-6 and p.min() >= 0 and p.max() <= 1
    # tau = 1: the first adversarial point is one step past the last clean one, further out.
    far = threat.lp_norm(points.first_adv - x, "linf") >= threat.lp_norm(points.last_clean - x, "linf") - 1e-6
    assert bool(far[points.stopped].all())


def test_bat_learns_and_its_uniform_terms_raise_the_entropy_at_the_boundary(mnist, tmp_path,
                                                                           natural_checkpoint):
    data = data_of(mnist, 64)
    batch = fixed_batch(data)
    end = {}
    for weight in (1.0, 0.0):
        cfg = config(mnist, tmp_path, "recipe=bat", f"at.init={natural_checkpoint}", "at.epochs=4",
                     "optim.lr=0.02", "at.beta=1", f"bat.uniform_weight={weight}")
        trainer = trainer_of(cfg, data)
        start = objective(trainer, batch)
        trainer.fit()
        end[weight] = objective(trainer, batch)
        # Eight adversarial steps amplify round-off into a different trajectory on other kernels
        # (AVX-512, AVX2, SSE; MKL code paths): end / start measured 0.44-0.50 with the term on
        # but 0.43-0.82 for the baseline without it, so that one need only have learned.
        assert end[weight]["loss"] < (0.8 if weight else 1.0) * start["loss"]
    # The term is in the loss exactly once per boundary point ...
    trainer.recipe.cfg.bat.uniform_weight = 1.0
    with_term = objective(trainer, batch)["loss"]
    assert with_term - end[0.0]["loss"] == pytest.approx(end[0.0]["uniform_kl"], rel=1e-4)
    # ... and it does what BAT wants: predictions at the boundary points closer to uniform.
    assert 0 < end[1.0]["uniform_kl"] < end[0.0]["uniform_kl"]


# -- FRL ---------------------------------------------------------------------------------------------

def test_frl_class_weights_and_radii_move_toward_the_worst_class(mnist, tmp_path, natural_checkpoint):
    cfg = config(mnist, tmp_path, "recipe=frl", f"at.init={natural_checkpoint}", "at.holdout=200",
                 "frl.tau_nat=0", "frl.tau_bdy=0", "frl.val_steps=5", "at.epochs=2", "optim.lr=0.01",
                 "at.beta=1.5")
    data = data_of(mnist, 64, holdout=200)
    trainer = trainer_of(cfg, data)
    metrics = []
    trainer.callbacks = (lambda s, m: metrics.append(m),)
    recipe = trainer.recipe
    errors = recipe.validate(trainer)
    # The clean part of the validation pass, recomputed independently.
    model = trainer.models.modules["model"].eval()
    with torch.no_grad():
        held = data.holdout
        wrong = model(held.images.float() / 255).argmax(-1) != held.labels
    for c in range(10):
        in_c = held.labels == c
        assert float(errors.clean[c]) == pytest.approx(float(wrong[in_c].float().mean()), abs=1e-6)
    assert float(errors.total_clean) == pytest.approx(float(wrong.float().mean()), abs=1e-6)
    recipe.on_epoch_start(trainer)
    worst_clean, worst_bdy = int(errors.clean.argmax()), int(errors.boundary.argmax())
    assert int(recipe.w_nat.argmax()) == worst_clean and float(recipe.w_nat[worst_clean]) > 0.1
    assert int(recipe.eps_scale.argmax()) == worst_bdy and float(recipe.eps_scale[worst_bdy]) > 1.0
    below = errors.clean < errors.total_clean
    assert bool((recipe.w_nat[below] < 0.1).all())  # better-than-average classes give weight up
    torch.testing.assert_close(recipe.w_nat.sum(), torch.tensor(1.0))
    trainer.fit()  # the hooks run each epoch, the weights are logged
    assert [m for m in metrics if "frl_max_w_nat" in m][-1]["frl_max_w_nat"] > 0.1
    state = recipe.state_dict()
    assert set(state) == {"nat", "bdy", "margin"}


def test_frl_weight_helpers_follow_the_reference_formulas():
    lam = normalize_multipliers(torch.tensor([0.4, 0.3, -0.2, 0.0]), limit=0.5)
    torch.testing.assert_close(lam, torch.tensor([0.4, 0.3, 0.0, 0.0]) * 0.5 / 0.7)
    w = class_weights(lam)
    # cost_sensitive: w_i = 1/K + (K-1)/K lam_i - 1/K sum_{j != i} lam_j
    k = 4
    expected = torch.tensor([1 / k + (k - 1) / k * lam[i] - sum(lam[j] for j in range(k) if j != i) / k
                             for i in range(k)])
    torch.testing.assert_close(w, expected)


def test_pgd_takes_per_sample_radii_and_steps_at_the_call():
    """FRL's per-class eps and step go in at the call (no new attack, no host sync per batch)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4) * 0.5 + 0.25, torch.tensor([0, 1, 2, 0])
    attack = PGD("linf", 0.1, 0.01, 1, random_start=False)
    eps, step = torch.tensor([0.1, 0.05, 0.2, 0.1]), torch.tensor([0.02, 0.05, 0.03, 0.0])
    moved = threat.lp_norm(attack(model, x, y, eps=eps, step_size=step) - x, "linf")
    torch.testing.assert_close(moved, torch.minimum(step, eps))


def test_frl_needs_a_validation_split(mnist, tmp_path):
    with pytest.raises(ConfigError, match="at.holdout"):
        config(mnist, tmp_path, "recipe=frl")


# -- resume --------------------------------------------------------------------------------------------

def test_killed_frl_run_resumes_to_the_same_parameters_and_multipliers(mnist, tmp_path):
    """FRL's multipliers are updated at epoch starts and restored mid-epoch: killed after step 5
    (checkpoint at 3, inside the second epoch), resumed, the run ends with exactly the parameters
    and multipliers of an uninterrupted one."""
    common = ["recipe=frl", "at.epochs=3", "train.checkpoint_every=3", "at.holdout=64",
              "frl.val_steps=2", "frl.tau_nat=0", "frl.tau_bdy=0"]
    data = data_of(mnist, 64, holdout=64)  # 2 steps per epoch
    whole, resumed, _, _ = kill_and_resume(lambda name: config(mnist, tmp_path, *common, f"name={name}"), data,
                                           kill_at=5, checkpoint_at=3)
    for name in whole.models.trainable:
        assert_same_parameters(whole.models.modules[name], resumed.models.modules[name])
    for key, value in whole.recipe.state_dict().items():
        assert torch.equal(value, resumed.recipe.state_dict()[key]), key


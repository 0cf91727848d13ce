"""``at.select=best``: the engine scores every epoch of a plain recipe under PGD-10 on the
``at.holdout`` images and deploys the best (Rice et al. 2020's early stopping against robust
overfitting). On real MNIST (16x16, a small CNN of width 16, a few hundred images)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_same_parameters, kill_and_resume

from metarobust.attacks import build_attack
from metarobust.cli import main
from metarobust.errors import ConfigError
from metarobust.evaluation import evaluate_run
from metarobust.experiment import load_config, model_from_state, train_and_evaluate
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.data import TrainingData, take
from metarobust.training.engine import CLEAN, SELECT_STEPS, Trainer

BASE = ["data.dataset=mnist", "data.image_size=16", "model.name=small_cnn", "model.hidden=16", "model.drop_rate=0",
        "at.batch_size=64", "optim.schedule=constant", "optim.lr=0.05", "device=cpu", "train_attack.eps=0.1",
        "train_attack.steps=2", "train_attack.step_size=0.05", "attack.eps=0.1", "attack.steps=20",
        "attack.step_size=0.025", "eval.checks=false", "recipe=pgd_at", "at.holdout=128", "at.select=best"]


def config(mnist16, tmp_path, *extra):
    return load_config(None, [*BASE, f"data.root={mnist16[2]}", f"out_dir={tmp_path}", *extra])


def data_of(mnist16, train: int, holdout: int = 128, test: int = 0) -> TrainingData:
    train_store, test_store, _ = mnist16
    return TrainingData(take(train_store, torch.arange(train), "mnist/train"),
                        take(train_store, torch.arange(20000, 20000 + holdout), "mnist/holdout"),
                        take(test_store, torch.arange(test), "mnist/test") if test else None)


def scripted_scores(scores):
    """A ``Trainer.robust_accuracy`` that returns ``scores[epoch - 1]`` for the epoch just ended:
    the holdout score as a known function of the epoch, the same in every run."""

    def robust_accuracy(self, attack, model=None, batch=None, seed=None):
        return scores[self.step_count // self.steps_per_epoch - 1]

    return robust_accuracy


def test_best_checkpoint_holds_the_epoch_with_the_highest_holdout_score(mnist16, tmp_path, monkeypatch):
    """Scores 0.2, 0.5, 0.3, 0.5 for epochs 1-4: epoch 2 is the best (a tie keeps the earlier);
    best.pt holds epoch 2's weights and step, last.pt epoch 4's, and the deployed model is epoch 2."""
    monkeypatch.setattr(Trainer, "robust_accuracy", scripted_scores([0.2, 0.5, 0.3, 0.5]))
    cfg = config(mnist16, tmp_path, "at.epochs=4", "train.log_every=2", "name=argmax")
    run = RunDir(cfg, tensorboard=False)
    trainer = Trainer(cfg, run, data=data_of(mnist16, 128), progress=False)  # 2 steps per epoch
    weights = {}
    trainer.callbacks = (lambda step, m: weights.setdefault(step, {k: v.clone() for k, v in
                                                                   trainer.model.state_dict().items()}),)
    trainer.fit()
    run.close()
    assert trainer.best == {"epoch": 2, "step": 4, "holdout_acc": 0.5}
    best, last = load_checkpoint(run.best_path), load_checkpoint(run.checkpoint_path)
    assert best["step"] == 4 and last["step"] == 8 and best["selection"] == trainer.best
    assert set(best) == set(last)  # the same format
    assert all(torch.equal(best["model"][k], weights[4][k]) for k in weights[4])
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in weights[4])
    assert_same_parameters(trainer.selected_model(), with_weights(trainer.model, weights[4]))
    assert trainer.selected_step == 4
    logged = [m for m in run.metrics() if "holdout_acc" in m]
    assert [m["holdout_acc"] for m in logged] == [0.2, 0.5, 0.3, 0.5]
    assert [m["best_epoch"] for m in logged] == [1, 2, 2, 2]
    assert load_checkpoint(run.path)["step"] == 4  # a run folder's model is its best epoch


def with_weights(model, weights):
    out = copy.deepcopy(model)
    out.load_state_dict(weights)
    return out


def test_train_and_eval_score_the_best_epoch_which_scores_what_was_logged(mnist16, tmp_path, capsys):
    """The real score (PGD-10 with the attack section's eps and step, eval mode, noise from
    cfg.seed): the best epoch is the argmax of the logged scores; best.pt's weights, attacked
    again by hand, give the logged score; the end-of-training evaluation scores best.pt and
    reports it, and `metarobust eval RUN` scores best.pt (its step)."""
    cfg = config(mnist16, tmp_path, "at.epochs=3", "train.log_every=4", "name=real", "eval.points=100")
    data = data_of(mnist16, 256, test=100)  # 4 steps per epoch
    summary = train_and_evaluate(cfg, progress=False, data=data)
    run = tmp_path / "real"
    logged = [m["holdout_acc"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "holdout_acc" in m]
    assert len(logged) == 3
    best_epoch = logged.index(max(logged)) + 1
    assert summary["select"] == "best" and summary["best_epoch"] == best_epoch and summary["holdout"] == 128
    assert summary["best_holdout_acc"] == max(logged) and summary["step"] == 4 * best_epoch
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    model = model_from_state(cfg, state)
    attack = build_attack(replace(cfg.attack, name="pgd", steps=SELECT_STEPS, restarts=1))
    x, y = data.holdout.images.float() / 255, data.holdout.labels
    generator = torch.Generator().manual_seed(cfg.seed)
    x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean().item() == pytest.approx(max(logged), abs=1e-7)
    assert evaluate_run(cfg, model, data.test).robust_acc == summary["robust_acc"]  # the end scored best.pt
    assert "deployed epoch" in (run / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(run), "eval.points=20", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4 * best_epoch


def test_select_best_without_holdout_fails_before_any_training(mnist16, tmp_path):
    with pytest.raises(ConfigError, match=r"at\.select.*set at\.holdout=1000"):
        config(mnist16, tmp_path, "at.holdout=0")
    with pytest.raises(ConfigError, match="at.select"):
        config(mnist16, tmp_path, "at.select=first")
    with pytest.raises(ConfigError, match="at.select=best with recipe 'maml'"):
        config(mnist16, tmp_path, "recipe=maml")
    assert config(mnist16, tmp_path, "at.select=last", "at.holdout=0").at.select == "last"


def test_a_resumed_run_keeps_its_best_epoch(mnist16, tmp_path, monkeypatch):
    """Best at epoch 2 (step 4), killed after step 5, resumed from the checkpoint at 4: the later
    epochs score lower, so the resumed run still deploys epoch 2, read back from best.pt, with
    exactly the weights of the uninterrupted run."""
    monkeypatch.setattr(Trainer, "robust_accuracy", scripted_scores([0.3, 0.6, 0.2, 0.4]))
    data = data_of(mnist16, 128)  # 2 steps per epoch
    whole, resumed, whole_run, run = kill_and_resume(
        lambda name: config(mnist16, tmp_path, "at.epochs=4", "train.log_every=1", "train.checkpoint_every=4",
                            f"name={name}"), data, kill_at=5, checkpoint_at=4)
    assert whole.best == resumed.best == {"epoch": 2, "step": 4, "holdout_acc": 0.6}
    assert resumed._best_weights is None  # found before the kill: read from best.pt
    assert_same_parameters(whole.selected_model(), resumed.selected_model())
    assert_same_parameters(whole.model, resumed.model)
    assert whole_run.metrics() == run.metrics()


@pytest.mark.parametrize("recipe, select_on, expected", [("natural", "auto", "clean"), ("pgd_at", "auto", "robust"),
                                                         ("natural", "robust", "robust"), ("trades", "clean", "clean")])
def test_natural_training_selects_its_epoch_on_clean_accuracy_adversarial_training_on_robust(
        mnist16, tmp_path, monkeypatch, recipe, select_on, expected):
    """A naturally trained model's PGD accuracy is highest when it is barely trained (its epoch 1
    on CIFAR-10 at 22 % clean), so ``auto`` ranks the natural recipe's epochs by clean accuracy:
    the score is then the clean accuracy of the held-out images, the summary says so."""
    seen, original = [], Trainer.robust_accuracy

    def robust_accuracy(self, attack, model=None, batch=None, seed=None):
        seen.append(attack)
        return original(self, attack, model, batch, seed)

    monkeypatch.setattr(Trainer, "robust_accuracy", robust_accuracy)
    cfg = config(mnist16, tmp_path, f"recipe={recipe}", f"at.select_on={select_on}", "at.epochs=1", "name=on")
    trainer = Trainer(cfg, None, data=data_of(mnist16, 64), progress=False)
    trainer.fit()
    assert trainer.select_on == expected and len(seen) == 1
    model, holdout = trainer.selected_model(), trainer.data.holdout
    with torch.no_grad():
        clean = float((model.eval()(holdout.images.float() / 255).argmax(-1) == holdout.labels).float().mean())
    if expected == "clean":
        assert trainer.best["holdout_acc"] == pytest.approx(clean, abs=1e-6)
    else:
        assert seen[0] is not CLEAN


def test_an_unknown_selection_metric_is_refused(mnist16, tmp_path):
    with pytest.raises(ConfigError, match="at.select_on"):
        config(mnist16, tmp_path, "at.select_on=loss")


def test_a_checkpoint_from_before_select_on_resumes_with_its_best_epoch(mnist16, tmp_path):
    """Checkpoints written before ``at.select_on`` named the score ``holdout_robust_acc``."""
    cfg = config(mnist16, tmp_path, "at.epochs=1", "name=old")
    trainer = Trainer(cfg, None, data=data_of(mnist16, 64), progress=False)
    trainer.fit()
    state = trainer.state_dict()
    state["selection"] = {"epoch": 1, "step": 1, "holdout_robust_acc": 0.25}
    resumed = Trainer(cfg, None, data=data_of(mnist16, 64), progress=False)
    resumed._restore(state)
    assert resumed.best == {"epoch": 1, "step": 1, "holdout_acc": 0.25}

"""MCG's generator training as recipes of the one trainer (``mcg_pretrain``, ``mcg_reptile``), on
real MNIST at 16x16 with a naturally trained surrogate run: the engine's Reptile step is
:func:`reptile_task`'s outer interpolation, stage 1 trains on exactly the transfer pairs of
:func:`transfer_pairs`, both stages resume bit-exactly, and bad settings are refused first."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_parameters, kill_and_resume

from metarobust.blackbox.mcg import MCGConfig
from metarobust.blackbox.mcg.training import reptile_task, transfer_pairs
from metarobust.errors import ConfigError
from metarobust.experiment import load_config
from metarobust.runs import RunDir
from metarobust.training.data import TrainingData, take
from metarobust.training.engine import Trainer
from metarobust.training.recipes import Models, StepContext, build_recipe

TINY = "{levels: 2, steps: 1, hidden: 8, x_hidden_channels: 4, x_hidden_size: 8}"
SMALL = ("{transfer_steps: 2, pretrain_epochs: 2, pretrain_batch: 16, meta_epochs: 2, meta_batch: 16, "
         "inner_steps: 2, confidence: [0.0, 1.0]}")


@pytest.fixture(scope="module")
def mnist(mnist16):
    """64 training images of the session's 16x16 MNIST, and its root."""
    train, _, root = mnist16
    return take(train, torch.arange(64), "mnist/train"), root


@pytest.fixture(scope="module")
def surrogate(mnist, tmp_path_factory):
    """A run folder of ``metarobust train``: a small CNN trained naturally for a few steps."""
    store, root = mnist
    out = tmp_path_factory.mktemp("surrogate")
    cfg = load_config(None, ["recipe=natural", "data.dataset=mnist", "data.image_size=16", f"data.root={root}",
                             "model.name=small_cnn", "model.hidden=8", "model.drop_rate=0", "at.batch_size=16",
                             "at.epochs=2", "optim.schedule=constant", "optim.lr=0.05", "device=cpu", f"out_dir={out}",
                             "name=surrogate", "attack.eps=0.3"])
    run = RunDir(cfg, tensorboard=False)
    Trainer(cfg, run, data=TrainingData(store, None, None), progress=False).fit()
    run.close()
    return str(out / "surrogate")


def mcg_config(mnist, surrogate, tmp_path, recipe: str, *extra: str):
    return load_config(None, [f"recipe={recipe}", "data.dataset=mnist", "data.image_size=16", f"data.root={mnist[1]}",
                              "device=cpu", f"out_dir={tmp_path}", f"mcg.surrogates=[{surrogate}]",
                              f"mcg.generator={TINY}", f"mcg.config={SMALL}", "train.log_every=1",
                              "train.checkpoint_every=3", *extra])


def data(mnist) -> TrainingData:
    return TrainingData(mnist[0], None, None)


def test_stage_1_trains_on_the_transfer_pairs_of_every_image_and_lowers_the_nll(mnist, surrogate, tmp_path):
    cfg = mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "name=stage1")
    trainer = Trainer(cfg, None, data=data(mnist), progress=False)
    assert trainer.total_steps == 2 * 4 and not trainer.compile_decision.on
    assert trainer.optim.name == "adam" and trainer.optim.lr == MCGConfig().pretrain_lr  # MCG's, from mcg.config
    recipe, models = trainer.recipe, trainer.models
    recipe.make_pairs(models)
    store = mnist[0]
    x = store.images.float() / 255
    _, delta, kept = transfer_pairs(models.raw["surrogate0"], x, store.labels, "linf", 0.3, recipe.settings)
    (mine, theirs), = recipe._pairs
    assert torch.equal(mine, kept) and int(kept.sum()) > 0
    torch.testing.assert_close(theirs[kept], delta, rtol=0, atol=1e-6)  # one chunk: the same MI-FGSM
    generator = models.modules["model"]
    with torch.no_grad():
        before = generator.nll(x[kept], delta).mean()
    trainer.fit()
    with torch.no_grad():
        after = generator.nll(x[kept], delta).mean()
    assert after < before
    assert generator.cfg.eps == 0.3 and generator.cfg.shape == (1, 16, 16)  # eps: the surrogate's attack.eps


def test_the_engines_reptile_step_is_reptile_tasks_interpolation(mnist, surrogate, tmp_path):
    stage1 = mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "name=stage1", "mcg.config.pretrain_epochs=1")
    Trainer(stage1, RunDir(stage1, tensorboard=False), data=data(mnist), progress=False).fit()
    cfg = mcg_config(mnist, surrogate, tmp_path, "mcg_reptile", "name=stage2", f"mcg.stage1={tmp_path / 'stage1'}")
    trainer = Trainer(cfg, None, data=data(mnist), progress=False)
    beta = MCGConfig(meta_batch=16, inner_steps=2).outer_step
    assert trainer.optim.name == "sgd" and trainer.optim.lr == pytest.approx(beta) and trainer.optim.momentum == 0
    generator = trainer.models.modules["model"]
    reference = copy.deepcopy(generator)
    rng = torch.Generator().manual_seed(5)
    trainer.generator.set_state(rng.get_state())
    batch = trainer.sampler.sample()
    trainer.sampler = type("Once", (), {"sample": lambda self: batch})()
    trainer.train_step()
    task = reptile_task(reference, [trainer.models.raw["surrogate0"]], batch.x, batch.y,
                        MCGConfig(**{**trainer.recipe.section.config, "outer_lr": beta, "outer_lr_scaled": False}),
                        torch.Generator().manual_seed(5))
    moved = 0.0
    for p, q, t in zip(generator.parameters(), reference.parameters(), task, strict=True):
        # theta - beta (theta - task) against theta + beta (task - theta): a few float32 roundings apart
        torch.testing.assert_close(p, q, rtol=0, atol=8 * torch.finfo(torch.float32).eps * (1 + float(t.abs().max())))
        moved += float((t - p.detach()).abs().sum())
    assert moved > 0  # the inner loop went somewhere, and the step moved only beta of the way


@pytest.mark.parametrize("stage", ["mcg_pretrain", "mcg_reptile"])
def test_a_killed_stage_resumes_to_the_same_generator(mnist, surrogate, tmp_path, stage):
    extra = []
    if stage == "mcg_reptile":
        first = mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "name=stage1", "mcg.config.pretrain_epochs=1")
        Trainer(first, RunDir(first, tensorboard=False), data=data(mnist), progress=False).fit()
        extra = [f"mcg.stage1={tmp_path / 'stage1'}"]
    whole, resumed, whole_run, run = kill_and_resume(
        lambda name: mcg_config(mnist, surrogate, tmp_path, stage, f"name={name}", *extra), data(mnist),
        kill_at=5, checkpoint_at=3)
    assert_same_parameters(whole.model, resumed.model)
    assert whole_run.metrics() == run.metrics()


def test_bad_mcg_settings_are_refused_before_any_work(mnist, surrogate, tmp_path):
    with pytest.raises(ConfigError, match="mcg.surrogates is empty"):
        load_config(None, ["recipe=mcg_pretrain", "data.dataset=mnist"])
    with pytest.raises(ConfigError, match="mcg.stage1 is empty"):
        mcg_config(mnist, surrogate, tmp_path, "mcg_reptile")
    with pytest.raises(ConfigError, match=r"mcg.generator.eps"):
        mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "mcg.generator.eps=0.1")
    with pytest.raises(ConfigError, match="unknown field"):
        mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "mcg.config.pretrain_epoch=3")
    with pytest.raises(ConfigError, match="plain SGD"):
        mcg_config(mnist, surrogate, tmp_path, "mcg_reptile", "mcg.stage1=x", "optim.momentum=0.9")
    with pytest.raises(ConfigError, match="does not exist|no checkpoint|not a"):
        build_recipe(mcg_config(mnist, str(tmp_path / "nowhere"), tmp_path, "mcg_pretrain"))
    cfg = mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "data.dataset=cifar10")
    with pytest.raises(ConfigError, match="trained on 'mnist'"):
        build_recipe(cfg).roles()
    recipe = build_recipe(mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", f"mcg.surrogates=[{surrogate},"
                                                                                f"{surrogate}]"))
    assert not recipe.fewshot
    recipe.saved[1]["recipe"] = "maml"  # as a meta-learner run's checkpoint records it
    with pytest.raises(ConfigError, match=r"mcg.surrogates mix plain classifiers .* and few-shot learners"):
        recipe.check_surrogates()
    recipe.saved[0]["recipe"] = "maml"
    recipe.saved[0]["meta"], recipe.saved[1]["meta"] = {"ways": 5}, {"ways": 20}
    with pytest.raises(ConfigError, match=r"different meta.ways \[5, 20\]"):
        recipe.check_surrogates()
    from metarobust.experiment import train_and_evaluate

    with pytest.raises(ConfigError, match="blackbox-train"):
        train_and_evaluate(mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "name=refused"), data=data(mnist))
    assert not (tmp_path / "refused").exists()


def test_an_empty_batch_of_pairs_is_a_zero_loss_with_a_graph(mnist, surrogate, tmp_path):
    cfg = mcg_config(mnist, surrogate, tmp_path, "mcg_pretrain", "mcg.config.confidence=[0.999999, 1.0]")
    trainer = Trainer(cfg, None, data=data(mnist), progress=False)
    recipe = trainer.recipe
    recipe._pairs = [(torch.zeros(len(mnist[0]), dtype=torch.bool), torch.zeros(len(mnist[0]), 1, 16, 16))]
    ctx = StepContext(0, 0, 0.0, 0, trainer.generator, 10)
    loss, stats = recipe.loss(Models(trainer.models._train, trainer.models.raw, trainer.models.modules,
                                     trainer.models.trainable), trainer.sampler.sample(), ctx)
    loss.backward()
    assert float(loss) == 0.0 and float(stats["pairs"]) == 0.0


def test_blackbox_train_runs_both_stages_in_the_trainer_resumes_and_reuses(mnist, surrogate, tmp_path, monkeypatch):
    """``metarobust blackbox-train`` with plain surrogates: the two recipes in run folders beside
    ``out``; killed in stage 2, a rerun resumes it and ends with the uninterrupted generator; a
    finished ``out`` is reused, one made with other settings refused."""
    from metarobust.blackbox.mcg import fit
    from metarobust.blackbox.mcg.checkpoint import load_generator
    from metarobust.training.recipes.mcg import MCGReptile

    small = {"transfer_steps": 2, "pretrain_epochs": 2, "pretrain_batch": 16, "meta_epochs": 2, "meta_batch": 16,
             "inner_steps": 1, "confidence": [0.0, 1.0]}

    def config(name, **changes):
        return fit.MCGTrainConfig(surrogates=[surrogate], out=str(tmp_path / name), images=64, eps=0.3,
                                  generator={"levels": 2, "steps": 1, "hidden": 8, "x_hidden_channels": 4,
                                             "x_hidden_size": 8}, mcg={**small, **changes},
                                  overrides=[f"data.root={mnist[1]}", "data.image_size=16", "device=cpu"])

    whole = fit.train_generator(config("whole.pt"), progress=False)
    assert whole["resumed"] is None and whole["images"] == 64 and whole["pairs"] > 0
    assert len(whole["stage1_nll"]) == 2 and len(whole["stage2_margin"]) == 2
    assert (tmp_path / "whole.pt.stage1" / "checkpoints" / "last.pt").is_file()
    real, calls = MCGReptile.backward, []

    def dying(self, *args, **kwargs):
        if len(calls) == 5:  # stage 2 has 4 steps an epoch: killed in its second epoch
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MCGReptile, "backward", dying)
    with pytest.raises(KeyboardInterrupt):
        fit.train_generator(config("killed.pt"), progress=False)
    monkeypatch.setattr(MCGReptile, "backward", real)
    again = fit.train_generator(config("killed.pt"), progress=False)
    assert again["resumed"] == "stage2" and again["stage2_margin"] == whole["stage2_margin"]
    a, b = load_generator(tmp_path / "whole.pt")[0], load_generator(tmp_path / "killed.pt")[0]
    assert_same_parameters(a, b)
    assert fit.train_generator(config("whole.pt"), progress=False)["resumed"] == "done"
    with pytest.raises(ConfigError, match="other settings"):
        fit.train_generator(config("whole.pt", meta_epochs=3), progress=False)


def test_stage_configs_carry_the_surrogates_data_settings_including_nulls(mnist, surrogate, tmp_path):
    """The stage configs take the surrogate run's dataset, root and image size as they are (a
    null image size stays null: the dataset's own)."""
    from dataclasses import replace

    from metarobust.blackbox.mcg import fit
    from metarobust.experiment import model_from_checkpoint

    run_cfg = model_from_checkpoint(surrogate, [f"data.root={mnist[1]}"])[0]
    cfg = fit.MCGTrainConfig(surrogates=[surrogate], out=str(tmp_path / "g.pt"), images=32, eps=0.3)
    for size in (16, None):
        first, second = fit.stage_configs(cfg, replace(run_cfg, data=replace(run_cfg.data, image_size=size)))
        assert first.data.image_size == second.data.image_size == size
        assert first.recipe == "mcg_pretrain" and second.mcg.stage1 == str(tmp_path / "g.pt.stage1")
        assert first.at.train_size == 32 and first.data.root == mnist[1]
    for bad, match in (({"eps": 0.1}, r"blackbox-train generator.eps is set from"),
                       ({"levles": 2}, r"blackbox-train generator: unknown field")):
        with pytest.raises(ConfigError, match=match):  # refused by check(), before any run is read
            fit.MCGTrainConfig(surrogates=[surrogate], out=str(tmp_path / "g.pt"), generator=bad).check()

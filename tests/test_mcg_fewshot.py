"""MCG on few-shot targets: surrogate meta-learners adapted per episode, the generator trained on
episodes by the ``mcg_pretrain`` / ``mcg_reptile`` recipes of the one trainer (exact pairs, one
episode per Reptile task, exact resume), the runner's mcg+ rows, and the errors that name
blackbox.mcg.surrogates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metarobust.attacks.threat import in_threat_model
from metarobust.blackbox.mcg import GeneratorConfig, History, MCGConfig, MCGGenerator, SurrogateRefresh
from metarobust.blackbox.mcg.checkpoint import save_generator
from metarobust.blackbox.mcg.fewshot import AdaptedSurrogate, adapt_surrogates, surrogate_learners
from metarobust.blackbox.mcg.training import snapshot
from metarobust.blackbox.run import BlackboxConfig, MCGSection, TargetEpisodes, mcg_attacks, targets
from metarobust.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:no frozen episodes")  # the tiny runs freeze their own
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["model.hidden=8", "meta.meta_batch_size=2", "meta.queries=2", "meta.test_inner_steps=1",
         "train.iterations=2", "train.checkpoint_every=2", "eval.episodes=2", "eval.batch_size=2",
         "eval.check_points=4", "eval.checks=false", "eval.eps_sweep=[]", "recipe=maml"]
TINY = {"levels": 2, "steps": 1, "hidden": 8, "x_hidden_channels": 4, "x_hidden_size": 8}
EPS = 0.1
FAST = {"transfer_steps": 2, "confidence": [0.0, 1.0], "pretrain_epochs": 1, "pretrain_batch": 8, "meta_epochs": 1,
        "inner_steps": 1}
"""Generator training in a second: 2 MI-FGSM steps, every correctly classified query image kept."""


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny MAML runs on glyphs (5-way 1-shot 2-query): the target (seed 0) and a surrogate
    (seed 1), trained for 2 meta-steps by ``metarobust train``'s machinery."""
    from metarobust.experiment import load_config, train_and_evaluate

    out = tmp_path_factory.mktemp("fewshot_runs")
    paths = []
    for name, seed in (("target", 0), ("surrogate", 1)):
        cfg = load_config(CONFIGS / "quickstart.yaml", [*SMALL, f"name={name}", f"seed={seed}", f"out_dir={out}"])
        paths.append(Path(train_and_evaluate(cfg, progress=False)["run"]))
    return tuple(paths)


@pytest.fixture(scope="module")
def target(runs):
    """``targets()`` of the target run: its 2 frozen test episodes as groups, and the episodes."""
    return targets(BlackboxConfig(run=str(runs[0]), episodes=2, eps=EPS))


def test_an_adapted_surrogate_gives_its_learners_adapted_logits_on_the_episode_labels(runs, target):
    from metarobust.evaluation.fewshot import adapted_episodes
    from metarobust.experiment import resolve_manifest
    from metarobust.training.data import load_training_data
    from metarobust.training.recipes import build_recipe

    run_cfg, groups, episodes = target
    assert isinstance(episodes, TargetEpisodes) and len(episodes.episodes) == len(groups) == 2
    assert episodes.dataset == "glyphs" and episodes.ways == 5
    [run] = surrogate_learners([str(runs[1])], device="cpu", ways=episodes.ways)
    # the reference: evaluation's own path (adapted_episodes) on the target's frozen episodes
    s_cfg = run.cfg
    test = load_training_data(s_cfg, build_recipe(s_cfg), torch.device("cpu")).test
    s_cfg.eval.manifest = run_cfg.eval.manifest
    manifest = resolve_manifest(s_cfg, test)
    reference = list(adapted_episodes(run.model, test, manifest, s_cfg, run.learner))
    for (_, qx, qy, _), episode, (forward, ref_episode, _) in zip(groups, episodes.episodes, reference, strict=False):
        assert torch.equal(episode.support_x, ref_episode.support_x) and torch.equal(qx, ref_episode.query_x)
        [surrogate] = adapt_surrogates([run], episode.support_x, episode.support_y)
        assert isinstance(surrogate, AdaptedSurrogate) and not surrogate.training
        with torch.no_grad():
            logits, expected = surrogate(qx), forward(qx)
        assert logits.shape == (len(qx), 5)
        # the same weights through the same functional forward: float32 round-off only
        assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5)
        assert int(qy.max()) < 5


def test_the_surrogate_refresh_steps_the_adapted_weights_and_never_the_runs_model(runs, target):
    _, groups, episodes = target
    [run] = surrogate_learners([str(runs[1])], device="cpu", ways=5)
    episode, (forward, qx, qy, _) = episodes.episodes[0], groups[0]
    [surrogate] = adapt_surrogates([run], episode.support_x, episode.support_y)
    assert len(list(surrogate.parameters())) == len(list(run.model.parameters()))  # MAML adapts every weight
    before, model_before = snapshot(surrogate), snapshot(run.model)
    history = History()
    with torch.no_grad():
        history.add(qx, qy, forward(qx).softmax(-1), "probs", kind="clean")  # the target's answers
    refresh = SurrogateRefresh(surrogate, MCGConfig(surrogate_lr=0.05, surrogate_clip=10.0, surrogate_batch=4))
    assert refresh.step(history, seeded(0)) and refresh.step(history, seeded(1))
    assert any(not torch.equal(a, b) for a, b in zip(before, surrogate.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model_before, run.model.parameters(), strict=True))


def test_blackbox_train_on_a_few_shot_surrogate_then_the_runner_gives_exact_mcg_rows(runs, target, tmp_path,
                                                                                      monkeypatch):
    from metarobust.blackbox import run as runner
    from metarobust.blackbox.mcg.fit import MCGTrainConfig, train_generator

    train = MCGTrainConfig(surrogates=[str(runs[1])], out=str(tmp_path / "g.pt"), eps=EPS, episodes=3,
                           generator=TINY, mcg=FAST, overrides=["device=cpu"])
    train.check()
    summary = train_generator(train, progress=False)
    assert summary["episodes"] == 3 and summary["images"] == 3 * 5 * 2 and summary["pairs"] > 0
    assert len(summary["stage2_margin"]) == 1 and summary["resumed"] is None
    assert train_generator(train, progress=False)["resumed"] == "done"  # same settings: reused
    with pytest.raises(ConfigError, match="other settings"):  # the new field is part of the settings
        train_generator(MCGTrainConfig(**{**train.__dict__, "episodes": 4}), progress=False)

    seen = []

    def recording(attack, mcg, oracle, x, y, generator, proposal_rng):
        budget = oracle.budget.clone()
        outcome = real(attack, mcg, oracle, x, y, generator, proposal_rng)
        seen.append((budget, outcome, oracle.queries.clone(), x))
        return outcome

    real = runner.seeded_attack
    monkeypatch.setattr(runner, "seeded_attack", recording)
    cfg = BlackboxConfig(run=str(runs[0]), attacks=["signhunter", "square"], budget=12, episodes=2, eps=EPS,
                         whitebox_check=False, out=str(tmp_path / "bb"),
                         mcg=MCGSection(enabled=True, generator=summary["generator"], surrogates=[str(runs[1])],
                                        config={"glow_steps": 1, "surrogate_batch": 4}))
    cfg.check()
    result, _ = runner.run_blackbox(cfg)
    assert set(result["attacks"]) == {"signhunter", "square", "mcg+signhunter", "mcg+square"}
    for name in ("signhunter", "square"):
        assert result["attacks"][f"mcg+{name}"]["attacked"] == result["attacks"][name]["attacked"]
    assert len(seen) == 2 * 2  # two attacks x two episodes
    assert sum(int((budget > 0).sum()) for budget, *_ in seen) > 0, "no clean-correct point was attacked"
    for budget, outcome, charged, x in seen:
        assert torch.equal(outcome.queries.cpu(), charged.cpu())  # every image the target saw, counted once
        assert bool((outcome.queries.cpu() <= budget.cpu()).all())
        assert bool((outcome.queries.cpu()[budget.cpu() > 0] >= 1).all())  # the proposal is always paid
        assert bool((outcome.queries.cpu()[budget.cpu() == 0] == 0).all())
        assert bool(in_threat_model(x, outcome.x_adv, "linf", EPS).all())
    assert result["mcg"]["surrogates"] == [str(runs[1])] and result["mcg"]["adapted_per_episode"]


def recipe_config(runs, tmp_path, recipe: str, *extra: str):
    """A generator-training run on glyphs with the MAML surrogate run, 3 training episodes."""
    from metarobust.experiment import load_config

    small = "{transfer_steps: 2, confidence: [0.0, 1.0], pretrain_epochs: 2, pretrain_batch: 8, meta_epochs: 2, " \
            "inner_steps: 1}"
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    return load_config(None, [f"recipe={recipe}", "data.dataset=glyphs", "device=cpu", f"out_dir={tmp_path}",
                              f"mcg.surrogates=[{runs[1]}]", "mcg.episodes=3", f"mcg.eps={EPS}",
                              f"mcg.generator={tiny}", f"mcg.config={small}", "train.log_every=1",
                              "train.checkpoint_every=2", *extra])


def test_stage_1_on_few_shot_surrogates_pairs_each_episodes_queries_with_its_adapted_surrogate(runs, tmp_path):
    from metarobust.blackbox.mcg.training import transfer_pairs
    from metarobust.data.sampler import to_float
    from metarobust.training.engine import Trainer

    trainer = Trainer(recipe_config(runs, tmp_path, "mcg_pretrain", "name=s1"), None, progress=False)
    recipe, models = trainer.recipe, trainer.models
    assert recipe.fewshot and recipe.episode_shape == (5, 1, 2)
    pool = recipe.pool
    assert len(recipe.store) == 3 * 5 * 2 and trainer.total_steps == 2 * (30 // 8)
    with torch.no_grad():  # the meta-learner's head scores the episode labels
        assert models.modules["surrogate0"](torch.rand(2, 1, 28, 28)).shape == (2, 5)
    recipe.make_pairs(models)
    (kept, delta), = recipe._pairs
    [run] = surrogate_learners([str(runs[1])], device="cpu", ways=5)  # the runner's path, independently
    for t in range(pool.episodes):
        sx, sy = pool.support(t)
        assert sx.shape == (5, 1, 28, 28) and torch.equal(sy.sort().values, torch.arange(5))
        [surrogate] = adapt_surrogates([run], sx, sy)
        span = pool.span(t)
        x, y = to_float(recipe.store.images[span]), recipe.store.labels[span]
        _, d, keep = transfer_pairs(surrogate, x, y, "linf", EPS, recipe.settings)
        assert torch.equal(kept[span], keep)
        torch.testing.assert_close(delta[span][keep], d, rtol=0, atol=1e-6)  # float32 round-off of one forward
    assert int(kept.sum()) > 0 and bool((delta.abs() <= EPS + 1e-6).all())
    trainer.fit()


def test_stage_2_on_few_shot_surrogates_takes_one_episode_per_step_and_resumes_exactly(runs, tmp_path):
    from conftest import assert_same_parameters, kill_and_resume

    from metarobust.runs import RunDir
    from metarobust.training.data import TrainingData, load_training_data
    from metarobust.training.engine import Trainer

    first = recipe_config(runs, tmp_path, "mcg_pretrain", "name=stage1", "mcg.config.pretrain_epochs=1")
    Trainer(first, RunDir(first, tensorboard=False), progress=False).fit()
    make = lambda name: recipe_config(runs, tmp_path, "mcg_reptile", f"name={name}",  # noqa: E731
                                      f"mcg.stage1={tmp_path / 'stage1'}")
    trainer = Trainer(make("probe"), None, progress=False)
    assert trainer.total_steps == 2 * 3 and trainer.steps_per_epoch == 3
    pool, seen = trainer.recipe.pool, []
    for _ in range(3):  # one epoch: every episode once, each its whole query set
        batch = trainer.sampler.sample()
        t = pool.episode_of(batch.index)
        assert torch.equal(batch.index, torch.arange(pool.span(t).start, pool.span(t).stop))
        seen.append(t)
    assert sorted(seen) == [0, 1, 2]
    train = load_training_data(make("data"), trainer.recipe, torch.device("cpu"), with_test=False).train
    whole, resumed, whole_run, run = kill_and_resume(make, TrainingData(train, None, None), kill_at=3,
                                                     checkpoint_at=2)
    assert_same_parameters(whole.model, resumed.model)
    assert whole_run.metrics() == run.metrics()


def test_surrogates_of_the_wrong_kind_dataset_or_ways_fail_naming_the_field(runs, target, tmp_path):
    from metarobust.data.episode import Episode

    _, groups, episodes = target
    generator = save_generator(tmp_path / "g.pt", MCGGenerator(GeneratorConfig((1, 28, 28), "linf", EPS, **TINY)))
    section = MCGSection(enabled=True, generator=str(generator), surrogates=[str(runs[1])])
    classifier = [(lambda x: torch.zeros(len(x), 10), groups[0][1], groups[0][2], False)]
    with pytest.raises(ConfigError, match=r"blackbox.mcg.surrogates: .*few-shot learner .*plain classifier"):
        mcg_attacks(section, classifier, "linf", EPS)  # a classifier target, a meta-learner surrogate
    with pytest.raises(ConfigError, match=r"blackbox.mcg.surrogates: .*trained on 'glyphs'.*'omniglot'"):
        mcg_attacks(section, groups, "linf", EPS, TargetEpisodes("omniglot", episodes.episodes))
    e = episodes.episodes[0]
    three = Episode(e.support_x[:3], e.support_y[:3], e.query_x[:6], e.query_y[:6] % 3, e.classes[:3])
    with pytest.raises(ConfigError, match=r"blackbox.mcg.surrogates: .*5-way learner.*3-way.*meta.ways=3"):
        mcg_attacks(section, groups[:1], "linf", EPS, TargetEpisodes("glyphs", [three]))
    built = mcg_attacks(section, groups, "linf", EPS, episodes)  # the right kind: one attack per episode
    assert len(built) == 2 and all(isinstance(s, AdaptedSurrogate) for a in built for s in a.surrogates)
    assert built[0].surrogates[0] is not built[1].surrogates[0]


def test_plain_classifier_surrogates_are_refused_for_few_shot_targets_and_mixed_in_training(runs, target,
                                                                                           tmp_path, shared_data):
    from metarobust.blackbox.mcg.fit import MCGTrainConfig, train_generator
    from metarobust.experiment import load_config, train_and_evaluate

    if not (shared_data / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("MNIST idx files not found")
    cfg = load_config(CONFIGS / "at" / "mnist_natural.yaml", [
        f"data.root={shared_data / 'mnist'}", "model.name=small_cnn", "model.hidden=8", "at.train_size=128",
        "at.epochs=1", "at.batch_size=64", "optim.schedule=constant", "eval.points=16", "eval.checks=false",
        "device=cpu", "name=plain",
        f"out_dir={tmp_path}"])
    plain = str(train_and_evaluate(cfg, progress=False)["run"])
    _, groups, episodes = target
    generator = save_generator(tmp_path / "g.pt", MCGGenerator(GeneratorConfig((1, 28, 28), "linf", EPS, **TINY)))
    section = MCGSection(enabled=True, generator=str(generator), surrogates=[plain])
    with pytest.raises(ConfigError, match=r"blackbox.mcg.surrogates: .*plain classifier.*meta-learner runs"):
        mcg_attacks(section, groups, "linf", EPS, episodes)
    mixed = MCGTrainConfig(surrogates=[plain, str(runs[1])], out=str(tmp_path / "m.pt"), eps=EPS, generator=TINY,
                           mcg=FAST)
    with pytest.raises(ConfigError, match="mix plain classifiers and few-shot learners"):
        train_generator(mixed, progress=False)

"""The robust meta-learning recipes as specifications: each trains on glyphs with sensible
statistics; ADML really adapts on adversarial support; R-MAML "in" puts the robust term in the
inner loop and "out" does not; ANIL adapts only the head; ITS-MAML trains with more shots than
it tests; RFS's torch logistic regression is scikit-learn's, and its attack goes through it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metarobust.attacks import PGD, build_attack
from metarobust.errors import ConfigError
from metarobust.experiment import load_config
from metarobust.meta.functional import functional_forward, params_of
from metarobust.meta.logistic import LogisticProbe, fit_logistic_regression
from metarobust.meta.maml import MAML
from metarobust.models.conv4 import Conv4
from metarobust.training import objectives
from metarobust.training.data import load_training_data
from metarobust.training.engine import Trainer
from metarobust.training.recipes import RECIPES, build_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.hidden=8", "meta.meta_batch_size=2", "meta.queries=2", "meta.inner_steps=1", "meta.inner_lr=0.4",
        "meta.test_inner_steps=1", "train.log_every=1", "train_attack.eps=0.1", "train_attack.step_size=0.125"]
META_RECIPES = ["maml", "anil", "adversarial_querying", "adml", "r_maml", "trades_maml", "its_maml"]


@pytest.fixture(scope="module")
def stores():
    cfg = load_config(CONFIGS / "meta" / "glyphs_maml.yaml", TINY)
    return load_training_data(cfg, build_recipe(cfg), torch.device("cpu"))


def tiny_cfg(*extra: str):
    return load_config(CONFIGS / "meta" / "glyphs_maml.yaml", [*TINY, *extra])


@pytest.mark.parametrize("recipe,extra", [(r, []) for r in META_RECIPES]
                         + [("r_maml", ["robust.placement=in"])],
                         ids=[*META_RECIPES, "r_maml_in"])
def test_every_meta_recipe_trains_on_glyphs_with_sensible_statistics(recipe, extra, stores):
    shots = ["meta.train_shots=2"] if recipe == "its_maml" else []
    trainer = Trainer(tiny_cfg(f"recipe={recipe}", *shots, *extra), data=stores, progress=False)
    params = dict(trainer.model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    loss, stats = trainer.train_step()
    assert torch.isfinite(loss), recipe
    for key in ("clean_acc", "adv_acc", "adv_adapted_clean_acc"):
        if key in stats:
            assert 0.0 <= float(stats[key]) <= 1.0, (recipe, key)
    attacking = recipe not in ("maml", "anil")
    assert ("adv_acc" in stats) == attacking, stats.keys()
    if "robust_term" in stats:
        assert float(stats["robust_term"]) >= 0  # a KL or a cross-entropy
    moved = max(float((params[k].detach() - before[k]).abs().max()) for k in before)
    assert moved > 0, "the meta-update changed nothing"


def test_adversarial_recipes_draw_their_noise_with_the_right_shapes(stores):
    cfg = tiny_cfg("recipe=adml", "meta.inner_steps=3")
    batch = Trainer(cfg, data=stores, progress=False).sampler.sample()
    noise = build_recipe(cfg).draw_noise(batch, torch.Generator().manual_seed(0))
    assert noise["query"].shape == batch.query_x.shape
    assert noise["support_steps"].shape == (batch.num_tasks, 3, *batch.support_x.shape[1:])
    assert build_recipe(tiny_cfg("recipe=maml")).draw_noise(batch, torch.Generator()) is None
    out = build_recipe(tiny_cfg("recipe=r_maml")).draw_noise(batch, torch.Generator())
    assert set(out) == {"query"}
    both = build_recipe(tiny_cfg("recipe=r_maml", "robust.placement=in")).draw_noise(batch, torch.Generator())
    assert set(both) == {"query", "support_steps"}


class RecordingMAML(MAML):
    """MAML that remembers the fast weights of every ``adapt`` call (and its step loss)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "calls", [])

    def adapt(self, params, x, y, steps=None, first_order=None, step_loss=None):
        fast = super().adapt(params, x, y, steps, first_order, step_loss)
        self.calls.append((step_loss is not None, {k: v.detach() for k, v in fast.items()}))
        return fast


def _one_task(cfg, stores, eps=None):
    """Run ``cfg.recipe``'s task function on one glyph task; returns the recording learner, the
    clean fast weights (plain MAML adaptation) and the parameters."""
    torch.manual_seed(0)
    model = Conv4(1, cfg.meta.ways, 28, hidden=8)
    params = params_of(model)
    attack_cfg = cfg.train_attack if eps is None else replace(cfg.train_attack, eps=eps)
    attack = build_attack(attack_cfg)
    learner = RecordingMAML(functional_forward(model), cfg.meta.inner_lr, cfg.meta.inner_steps)
    batch = Trainer(cfg, data=stores, progress=False).sampler.sample()
    recipe = build_recipe(replace(cfg, train_attack=attack_cfg))
    noise = recipe.draw_noise(batch, torch.Generator().manual_seed(1))
    task = recipe.task(learner, attack)
    t = 0
    task_noise = None if noise is None else {k: v[t] for k, v in noise.items()}
    loss, _ = task(params, batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t], task_noise)
    clean = MAML(functional_forward(model), cfg.meta.inner_lr, cfg.meta.inner_steps).adapt(
        params, batch.support_x[t], batch.support_y[t])
    return learner, {k: v.detach() for k, v in clean.items()}, loss


def _gap(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_adml_adapts_a_second_trajectory_on_adversarial_support(stores):
    cfg = tiny_cfg("recipe=adml", "meta.inner_steps=2")
    learner, clean, _ = _one_task(cfg, stores)
    (first_attacked, first), (second_attacked, adversarial) = learner.calls
    assert not first_attacked and second_attacked
    assert _gap(first, clean) < 1e-6  # the first trajectory is plain clean adaptation
    assert _gap(adversarial, clean) > 1e-3  # the second saw attacked support images
    learner0, clean0, _ = _one_task(cfg, stores, eps=0.0)  # guard: at eps 0 both trajectories coincide
    assert _gap(learner0.calls[1][1], clean0) < 1e-6


def test_r_maml_in_puts_the_robust_term_in_the_inner_loop_and_out_does_not(stores):
    inside, clean_in, _ = _one_task(tiny_cfg("recipe=r_maml", "robust.placement=in"), stores)
    outside, clean_out, _ = _one_task(tiny_cfg("recipe=r_maml", "robust.placement=out"), stores)
    assert inside.calls[0][0] and not outside.calls[0][0]
    assert _gap(outside.calls[0][1], clean_out) < 1e-6
    assert _gap(inside.calls[0][1], clean_in) > 1e-4
    # its inner step is exactly one SGD step on CE + weight x KL of the support, attacked
    cfg = tiny_cfg("recipe=r_maml", "robust.placement=in", "robust.inner_weight=0")
    zero, clean_zero, _ = _one_task(cfg, stores)
    assert _gap(zero.calls[0][1], clean_zero) < 1e-6  # weight 0: the clean inner loop again


def _trades_losses(cfg, batch, noise):
    """Each task's TRADES-MAML loss for ``batch`` with ``noise``, from fixed weights."""
    torch.manual_seed(0)
    model = Conv4(1, cfg.meta.ways, 28, hidden=8)
    recipe = build_recipe(cfg)
    recipe._kl_batch = recipe.meta_batch(batch) if recipe.whole else None
    task = recipe.task(recipe.learner(model), recipe.train_attack())
    return [float(task(params_of(model), batch.support_x[t], batch.support_y[t], batch.query_x[t],
                       batch.query_y[t], None if noise is None else {k: v[t] for k, v in noise.items()})[0].detach())
            for t in range(batch.num_tasks)]


def test_trades_maml_meta_batch_kl_spans_every_task_as_the_reference_code(stores):
    """robust.kl_batch=meta_batch: task i's KL term covers every task's support and query at
    task i's fast weights. With one task it is the default form; with two, changing task 1's
    query moves task 0's loss, which the default (task-local) form never sees."""
    deterministic = ["recipe=trades_maml", "train_attack.random_start=false"]
    one = tiny_cfg(*deterministic, "meta.meta_batch_size=1")
    batch = Trainer(one, data=stores, progress=False).sampler.sample()
    whole = tiny_cfg(*deterministic, "meta.meta_batch_size=1", "robust.kl_batch=meta_batch")
    assert _trades_losses(whole, batch, None) == _trades_losses(one, batch, None)

    two = tiny_cfg(*deterministic)
    batch = Trainer(two, data=stores, progress=False).sampler.sample()
    changed = replace(batch, query_x=torch.cat([batch.query_x[:1], batch.query_x[1:].flip(-1)]))
    meta = tiny_cfg(*deterministic, "robust.kl_batch=meta_batch")
    assert _trades_losses(two, changed, None)[0] == _trades_losses(two, batch, None)[0]
    assert abs(_trades_losses(meta, changed, None)[0] - _trades_losses(meta, batch, None)[0]) > 1e-4

    noisy = build_recipe(tiny_cfg("recipe=trades_maml", "robust.kl_batch=meta_batch"))
    noise = noisy.draw_noise(batch, torch.Generator().manual_seed(0))
    points = batch.num_tasks * (batch.support_x.shape[1] + batch.query_x.shape[1])
    assert set(noise) == {"meta_batch"} and noise["meta_batch"].shape == (batch.num_tasks, points, 1, 28, 28)
    with pytest.raises(ConfigError, match="robust.kl_batch=meta_batch"):
        noisy.draw_noise(batch, torch.Generator(), rank=0, world_size=2)
    losses = []
    for execution in ("loop", "vmap"):  # the engine's path: the whole batch reaches every task
        cfg = tiny_cfg("recipe=trades_maml", "robust.kl_batch=meta_batch", f"meta.execution={execution}")
        loss, stats = Trainer(cfg, data=stores, progress=False).train_step()
        assert torch.isfinite(loss) and 0 <= float(stats["adv_acc"]) <= 1
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # float32 sums in another order


def test_anil_adapts_only_the_head_in_training_and_at_test(stores):
    torch.manual_seed(0)
    model = Conv4(1, 5, 28, hidden=8)
    params = params_of(model)
    batch = Trainer(tiny_cfg("recipe=anil"), data=stores, progress=False).sampler.sample()
    for learner in (build_recipe(tiny_cfg("recipe=anil")).learner(model),
                    build_recipe(tiny_cfg("recipe=maml", "meta.adapt=head")).learner(model, steps=3, first_order=True)):
        fast = learner.adapt(params, batch.support_x[0], batch.support_y[0])
        for name, value in fast.items():
            if name.startswith("head."):
                assert not torch.equal(value, params[name]), name
            else:
                assert value is params[name], name  # the body's fast weights are the initial tensors
    full = build_recipe(tiny_cfg("recipe=maml")).learner(model).adapt(params, batch.support_x[0], batch.support_y[0])
    assert not torch.equal(full["encoder.0.0.weight"], params["encoder.0.0.weight"])
    assert build_recipe(tiny_cfg("recipe=anil")).evaluation_learner(model, 5).adapted == frozenset(
        {"head.weight", "head.bias"})
    assert build_recipe(tiny_cfg("recipe=maml")).evaluation_learner(model, 5).adapted is None  # all of them


def test_its_maml_trains_with_more_shots_than_it_tests(stores):
    with pytest.raises(ConfigError, match="meta.train_shots=1"):
        tiny_cfg("recipe=its_maml")
    cfg = load_config(CONFIGS / "meta" / "glyphs_its_maml.yaml", ["meta.queries=5"])
    assert cfg.meta.train_shots > cfg.meta.test_shots and cfg.meta.inner_steps < cfg.meta.test_inner_steps
    trainer = Trainer(replace(cfg, model=replace(cfg.model, hidden=8)), data=stores, progress=False)
    batch = trainer.sampler.sample()
    assert batch.support_x.shape[1] == cfg.meta.ways * cfg.meta.train_shots
    from metarobust.data.manifest import freeze_episodes

    manifest = freeze_episodes(stores.test, cfg.meta.ways, cfg.meta.test_shots, cfg.meta.queries, 2)
    assert manifest.shots == cfg.meta.test_shots


def test_every_shipped_meta_config_loads_and_names_a_registered_recipe():
    names = set()
    for path in sorted((CONFIGS / "meta").glob("*.yaml")):
        if path.stem.startswith("shots_study"):  # study files: scripts/shots_study.py
            continue
        cfg = load_config(path)
        assert cfg.name == path.stem, path
        assert RECIPES.get(cfg.recipe).evaluation == "fewshot"
        names.add(cfg.recipe)
    assert names >= {"maml", "anil", "adversarial_querying", "adml", "r_maml", "trades_maml", "its_maml", "rfs",
                     "rfs_adversarial"}
    assert {n for n in RECIPES.names() if RECIPES.get(n).evaluation == "fewshot"} <= names


# -- RFS ------------------------------------------------------------------------------------------

def _clusters(per_class: int, dim: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    return F.normalize(0.7 * centres[y] + torch.randn(len(y), dim, generator=g), dim=-1), y


@pytest.mark.parametrize("per_class,dim,classes", [(5, 16, 5), (20, 8, 3), (1, 640, 5)])
def test_rfs_logistic_regression_matches_scikit_learn(per_class, dim, classes):
    """Primal (more points than features) and dual (fewer) forms, float32, default steps."""
    from sklearn.linear_model import LogisticRegression

    x, y = _clusters(per_class, dim, classes, seed=per_class + dim)
    query, _ = _clusters(10, dim, classes, seed=99)
    reference = LogisticRegression(C=1.0, max_iter=1000, tol=1e-10).fit(x.double().numpy(), y.numpy())
    w, b = fit_logistic_regression(x, y, classes)
    ours = torch.softmax(query @ w.T + b, dim=-1).double().numpy()
    assert abs(ours - reference.predict_proba(query.double().numpy())).max() < 1e-5
    assert abs(w.double().numpy() - reference.coef_).max() < 1e-5
    # under vmap over episodes it is the same fit
    wv, bv = torch.vmap(lambda a, t: fit_logistic_regression(a, t, classes))(x.unsqueeze(0), y.unsqueeze(0))
    torch.testing.assert_close(wv[0], w, rtol=1e-5, atol=1e-6)


def test_rfs_probe_is_attacked_through_features_and_the_fitted_head():
    torch.manual_seed(0)
    model = Conv4(1, 20, 28, hidden=8, batch_norm="running").eval()
    probe = LogisticProbe(model.features, ways=3)
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(3, 1, 28, 28, generator=g)
    sy, qy = torch.arange(3).repeat_interleave(2), torch.arange(3).repeat_interleave(4)
    sx = (protos[sy] + 0.05 * torch.randn(6, 1, 28, 28, generator=g)).clamp(0, 1)
    qx = (protos[qy] + 0.05 * torch.randn(12, 1, 28, 28, generator=g)).clamp(0, 1)
    head = probe.adapt({}, sx, sy)
    clean = (probe.forward(head, qx).argmax(-1) == qy).float().mean()
    x_adv = PGD("linf", 0.3, 0.05, 10, random_start=False)(lambda x: probe.forward(head, x), qx, qy)
    robust = (probe.forward(head, x_adv).argmax(-1) == qy).float().mean()
    assert clean > 0.9 and robust < 0.2  # gradients reach the input through the head and features
    grad = torch.autograd.grad(probe.forward(head, qx.requires_grad_()).logsumexp(-1).sum(), qx)[0]
    assert grad.abs().sum() > 0


def test_rfs_recipes_pretrain_on_all_train_classes_and_score_episodes(tmp_path, stores):
    """RFS is a plain recipe of the one engine (mini-batches of every training class), scored per
    frozen episode with the logistic probe."""
    from metarobust.experiment import train_and_evaluate

    assert objectives.accuracy(torch.eye(3), torch.arange(3)) == 1  # (the objective helpers import)
    cfg = load_config(CONFIGS / "meta" / "glyphs_rfs_adversarial.yaml", [
        f"out_dir={tmp_path}", "model.hidden=8", "at.epochs=1", "at.train_size=128", "at.batch_size=64",
        "optim.milestones=[1]", "train_attack.steps=1", "train_attack.eps=0.1", "train_attack.step_size=0.05",
        "meta.queries=3", "eval.episodes=4", "eval.batch_size=4", "train.log_every=2"])
    summary = train_and_evaluate(cfg, progress=False)
    assert summary["pretrain_classes"] == stores.train.num_classes
    assert summary["episodes"] == 4 and 0 <= summary["robust_acc"] <= summary["clean_acc"] <= 1
    assert (Path(summary["run"]) / "report.md").read_text().startswith("# glyphs_rfs_adversarial")


def test_shots_study_files_give_a_valid_config_for_every_grid_point(tmp_path):
    """scripts/shots_study.py's grid: each point loads (validated), ITS-MAML at equal shots runs as
    R-MAML_out, and the shots and inner steps land in the run's config."""
    import argparse

    from conftest import load_script

    study_module = load_script("shots_study")
    flags = argparse.Namespace(recipes=None, train_shots="1,5", inner_steps=None, layers=None, iterations=None,
                               episodes=None, points=None, bootstrap=None, test_shots=None, seed=None, name=None,
                               replicate_seeds=None, cascade_episodes=None)
    for path in sorted((CONFIGS / "meta").glob("shots_study_*.yaml")):
        study, base = study_module.load_study(path, flags)
        assert study.train_shots == [1, 5] and study.inner_steps
        for recipe in study.recipes:
            for shots, steps in zip(study.train_shots, study.inner_steps * 2):
                cfg = study_module.run_config(study, base, recipe, shots, steps, tmp_path, tmp_path / "e.json", [])
                assert (cfg.meta.train_shots, cfg.meta.inner_steps) == (shots, steps)
                assert cfg.meta.test_shots == study.test_shots and cfg.train.iterations == study.iterations
                expected = "r_maml" if recipe == "its_maml" and shots == study.test_shots else recipe
                assert cfg.recipe == expected

"""The one evaluation package as a specification: the end of training and ``metarobust eval``
write the same ``eval.json``; a coupled (transductive batch-norm) episode is scored as the
attacked query set; intervals are over episodes for few-shot runs; vmap and the per-task loop
agree; the report names the robust number after what produced it."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from metarobust.attacks import build_attack
from metarobust.attacks.pgd import PGD
from metarobust.cli import main
from metarobust.data.manifest import freeze_episodes
from metarobust.evaluation import (
    EvalResult,
    adapted_episodes,
    console_table,
    evaluate_run,
    evaluate_units,
    fewshot_units,
    headline,
    render_report,
)
from metarobust.evaluation.harness import Unit, cascade
from metarobust.evaluation.result import Z_95
from metarobust.experiment import load_config, train_and_evaluate
from metarobust.training.data import load_training_data
from metarobust.training.engine import Trainer
from metarobust.training.recipes import build_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["model.hidden=8", "meta.meta_batch_size=2", "meta.queries=2", "meta.inner_steps=1",
         "meta.inner_lr=0.4", "meta.test_inner_steps=2", "train.log_every=1", "train.checkpoint_every=2",
         "train.iterations=4", "eval.episodes=10", "eval.batch_size=4", "eval.check_points=20",
         "eval.eps_sweep=[0.0,1.0,2.0]"]


@pytest.fixture(scope="module")
def stores():
    cfg = load_config(CONFIGS / "quickstart.yaml", SMALL)
    return load_training_data(cfg, build_recipe(cfg), torch.device("cpu"))


def learner_of(cfg, model, manifest):
    return build_recipe(cfg).evaluation_learner(model, manifest.ways)


def small_cfg(tmp_path, *extra):
    return load_config(CONFIGS / "quickstart.yaml", [*SMALL, f"out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def learner(stores):
    """A briefly meta-trained Conv-4 with transductive batch norm, its config and 12 episodes."""
    cfg = load_config(CONFIGS / "quickstart.yaml", [*SMALL, "recipe=maml"])
    model = Trainer(cfg, data=stores, progress=False).fit().eval()
    manifest = freeze_episodes(stores.test, cfg.meta.ways, cfg.meta.test_shots, cfg.meta.queries, 12, seed=3)
    return cfg, model, manifest


def test_end_of_training_and_metarobust_eval_write_the_same_eval_json(tmp_path, stores, capsys):
    cfg = small_cfg(tmp_path, "name=same", "recipe=r_maml")
    summary = train_and_evaluate(cfg, progress=False, data=stores)
    run = Path(summary["run"])
    at_training = json.loads((run / "eval.json").read_text())
    assert at_training["episodes"] == 10 and at_training["interval"] == "episodes"
    assert at_training["step"] == 4 and at_training["check_points"] == 20 and at_training["checks"]
    capsys.readouterr()
    assert main(["eval", str(run), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rescored = json.loads((run / "eval" / "default.json").read_text())  # beside eval.json, which stays
    assert json.loads((run / "eval.json").read_text()) == at_training
    assert rescored["robust_acc"] == at_training["robust_acc"] == printed["robust_acc"] == summary["robust_acc"]
    # every number, interval, class, check and sweep point; training adds what only it knows, a
    # later evaluation what it was asked (overrides, attack and eval settings) and by whom
    shared = set(rescored) & set(at_training) - {"plot"}
    assert {k: at_training[k] for k in shared} == {k: rescored[k] for k in shared}
    assert set(at_training) - set(rescored) == {"train_seconds", "optimizer", "stopped"}
    assert set(rescored) - set(at_training) == {"overrides", "attack", "eval", "provenance"}
    assert rescored["meta_order"] == "second"  # MAML's order is part of every meta-learning number
    for key in ("clean_acc", "clean_ci95", "robust_acc", "robust_ci95", "episodes"):
        assert key in printed, key
    report = (run / "report.md").read_text()
    assert "robust accuracy (PGD-10)" in report and "worst case" not in report


def test_a_coupled_episode_is_scored_as_the_attacked_query_set(learner, stores):
    """Transductive batch norm: a query point's prediction depends on the whole query set, so
    the harness attacks the whole set and scores it as the attack left it (no per-point
    mixture of clean and adversarial inputs, which no attack optimised)."""
    cfg, model, manifest = learner
    unit = next(fewshot_units(model, stores.test, manifest, cfg, learner_of(cfg, model, manifest)))
    assert unit.coupled and unit.groups == cfg.eval.batch_size
    attack = build_attack(cfg.attack)
    clean, robust, after = cascade(unit, [("pgd", attack)], torch.Generator().manual_seed(5))
    noise = attack.init_noise(unit.x, torch.Generator().manual_seed(5))
    expected = torch.zeros_like(robust)
    for t, (forward, episode, _) in zip(range(unit.groups), adapted_episodes(model, stores.test, manifest, cfg, learner_of(cfg, model, manifest))):
        x_adv = attack(forward, episode.query_x, episode.query_y, noise=noise[t])
        with torch.no_grad():
            expected[t] = (forward(x_adv).argmax(-1) == episode.query_y) & (
                forward(episode.query_x).argmax(-1) == episode.query_y)
    assert torch.equal(robust, expected) and torch.equal(after["pgd"], robust)
    assert bool((robust <= clean).all()) and bool(robust.any()) and not bool(robust.all())


def batch_centred_unit() -> Unit:
    """Four groups of 16 points under a model whose logits see the batch mean, as batch norm
    does: a strongly coupled unit, in float64 so that no CPU's round-off changes a verdict."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 3, generator=g, dtype=torch.float64)

    def forward(params, x):
        h = x.flatten(1)
        return 8 * (h - h.mean(0)) @ params["w"]

    x = torch.rand(4, 16, 1, 3, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = torch.stack([forward({"w": w}, xt).argmax(-1) for xt in x])
    return Unit(forward=forward, x=x, y=y, classes=y, shared={"w": w}, coupled=True)


def test_restarts_on_a_coupled_group_cannot_un_fool_a_point():
    """PGD keeps each point's best restart; in a coupled group that mixture of query sets was
    never attacked as a whole, and other points' changes un-fool some points in it. The verdict
    counts a point fooled in any restart's attacked set (checked by running every restart alone),
    and the cascade's robust accuracy is the worse of the two, here strictly."""
    unit = batch_centred_unit()
    pgd = PGD("linf", 0.05, 0.025, 2, True, 16)
    noise = pgd.init_noise(unit.x, torch.Generator().manual_seed(1))
    x_adv, fooled = unit.map(lambda f, xt, yt, nt: pgd(f, xt, yt, noise=nt, verdict=True), unit.x, unit.y, noise)
    one = PGD("linf", 0.05, 0.025, 2, True, 1)
    anywhere = torch.zeros_like(fooled)
    for r in range(16):
        anywhere |= unit.predict(unit.attack(one, unit.x, unit.y, noise[..., r].contiguous())) != unit.y
    assert torch.equal(fooled, anywhere)
    mixture = unit.predict(x_adv) == unit.y
    _, robust, _ = cascade(unit, [("pgd", pgd)], torch.Generator().manual_seed(1))
    assert torch.equal(robust, mixture & ~fooled)
    assert int(robust.sum()) < int(mixture.sum())  # the mixture alone reads more robust


def test_a_coupled_cascade_scores_every_attack_on_whole_query_sets(learner, stores):
    """The coupled cascade path on a meta-trained learner with transductive batch norm, PGD
    with restarts then APGD: each attack only lowers the robust set, and a point survives
    only if correct in what the attack returned and in every query set it scored."""
    cfg, model, manifest = learner
    unit = next(fewshot_units(model, stores.test, manifest, cfg, learner_of(cfg, model, manifest)))
    assert unit.coupled
    pgd = build_attack(replace(cfg.attack, eps=0.1, step_size=0.025, steps=3, restarts=3))
    apgd = build_attack(replace(cfg.attack, name="apgd", eps=0.1, steps=4, loss="ce"))
    clean, robust, after = cascade(unit, [("pgd", pgd), ("apgd", apgd)], torch.Generator().manual_seed(11))
    noise = pgd.init_noise(unit.x, torch.Generator().manual_seed(11))
    x_adv, fooled = unit.map(lambda f, xt, yt, nt: pgd(f, xt, yt, noise=nt, verdict=True), unit.x, unit.y, noise)
    assert torch.equal(after["pgd"], clean & (unit.predict(x_adv) == unit.y) & ~fooled)
    assert bool((after["apgd"] <= after["pgd"]).all()) and torch.equal(robust, after["apgd"])
    assert bool(robust.any()) and not bool(robust.all())  # neither trivial end


def test_fewshot_intervals_are_over_episodes(learner, stores):
    cfg, model, manifest = learner
    cfg = copy.deepcopy(cfg)
    cfg.eval.checks = False
    result = evaluate_units(fewshot_units(model, stores.test, manifest, cfg, learner_of(cfg, model, manifest)), cfg, manifest.ways,
                            stores.test.class_names, interval="episodes")
    per_episode = []
    for forward, episode, _ in adapted_episodes(model, stores.test, manifest, cfg, learner_of(cfg, model, manifest)):
        with torch.no_grad():
            per_episode.append(float((forward(episode.query_x).argmax(-1) == episode.query_y).float().mean()))
    accs = torch.tensor(per_episode, dtype=torch.float64)
    assert result.episodes == len(manifest) == 12 and result.points == 12 * manifest.ways * manifest.queries
    assert result.clean_acc == pytest.approx(float(accs.mean()))
    assert result.clean_ci95 == pytest.approx(Z_95 * float(accs.std()) / len(accs) ** 0.5)
    assert result.check_points == 0 and result.checks == [] and result.eps_sweep == []
    total = sum(c["points"] for c in result.per_class.values())
    assert total == result.points
    assert sum(c["robust_acc"] * c["points"] for c in result.per_class.values()) / total == \
        pytest.approx(result.robust_acc)


def test_vmap_and_the_per_task_loop_score_the_same(learner, stores):
    cfg, model, manifest = learner
    cfg = copy.deepcopy(cfg)
    cfg.eval.checks = False
    results = {}
    for execution in ("loop", "vmap"):
        cfg.meta.execution = execution
        results[execution] = evaluate_run(cfg, model, stores.test, manifest=manifest, learner=learner_of(cfg, model, manifest))
    loop, vmapped = results["loop"], results["vmap"]
    assert vmapped.clean_acc == loop.clean_acc
    # the same attack; float rounding of batched kernels may flip a rare near-tie point
    assert abs(vmapped.robust_acc - loop.robust_acc) <= 2 / loop.points
    assert loop.robust_acc < loop.clean_acc


def summary_of(after: dict[str, float]) -> dict:
    return EvalResult(clean_acc=0.8, clean_ci95=0.02, robust_acc=min(after.values()), robust_ci95=0.03,
                      after=after, after_ci95={k: 0.03 for k in after}, interval="points", points=500,
                      recipe="pgd_at", dataset="mnist").as_dict()


def test_the_report_names_the_robust_number_after_what_produced_it():
    cfg = load_config(CONFIGS / "quickstart.yaml", [])
    single = summary_of({"linf/pgd-10": 0.4})
    suite = {**summary_of({"linf/apgd-ce": 0.41, "linf/apgd-t": 0.39}), "suite": "apgd_ce_t"}
    for render in (lambda s: render_report(cfg, s, ["- trained briefly"]), lambda s: console_table({"m": s})):
        assert "PGD-10" in render(single) and "worst case" not in render(single)
        assert "APGD-CE + APGD-T subset: worst case of linf/apgd-ce, linf/apgd-t" in render(suite)
        assert "after linf/apgd-ce" in render(suite)
    assert "95 % binomial interval over 500 points" in render_report(cfg, single)
    line = headline(single)
    assert line["robust_acc"] == 0.4 and line["points"] == 500 and "episodes" not in line
    assert line["checks_failed"] == []


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Every ``metarobust`` module each file under ``folder`` imports (at any depth)."""
    import ast

    out = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path)] = {n for n in names if n.startswith("metarobust")}
    return out


def test_evaluation_imports_only_the_layers_below_it():
    package = Path(__file__).resolve().parents[1] / "metarobust"
    above = ("metarobust.training", "metarobust.experiment", "metarobust.cli", "metarobust.analysis")
    for path, names in imported_modules(package / "evaluation").items():
        assert not {n for n in names if n.startswith(above)}, path
    for layer in ("attacks", "data", "models", "meta"):
        for path, names in imported_modules(package / layer).items():
            assert not {n for n in names if n.startswith("metarobust.evaluation")}, path
    assert imported_modules(package / "evaluation")  # the scan saw the package


def test_strict_evaluation_makes_a_failed_masking_check_an_error(tmp_path):
    """A model that ignores its input is 'robust' at every eps: the large-eps and random-noise
    checks fail. A warning by default; with eval.strict an error (exit code 3 from the CLI)
    raised after eval.json is written."""
    from metarobust.data.store import ImageStore
    from metarobust.errors import ConfigError, MaskingCheckFailed
    from metarobust.runs import RunDir

    images = torch.randint(0, 256, (32, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(32) % 4, ["a", "b", "c", "d"], "toy/test")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.zero_()
    overrides = [f"out_dir={tmp_path}", "name=blind", "attack.steps=2", "eval.check_points=16",
                 "eval.eps_sweep=[0.0,1.0]"]
    with pytest.warns(UserWarning, match="possible gradient masking"):
        lenient = evaluate_run(load_config(CONFIGS / "quickstart.yaml", overrides), model, store)
    assert not all(c.passed for c in lenient.checks)
    cfg = load_config(CONFIGS / "quickstart.yaml", [*overrides, "eval.strict=true"])
    run = RunDir(cfg, tensorboard=False)
    with pytest.warns(UserWarning), pytest.raises(MaskingCheckFailed, match="a large eps breaks") as failed:
        evaluate_run(cfg, model, store, run=run)
    assert failed.value.exit_code == 3 and (run.path / "eval.json").is_file()
    with pytest.raises(ConfigError, match="eval.strict"):
        load_config(CONFIGS / "quickstart.yaml", ["eval.strict=true", "eval.checks=false"])

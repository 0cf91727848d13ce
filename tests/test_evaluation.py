"""The one evaluation package as a specification: the end of training and ``metarobust eval``
write the same ``eval.json``; a coupled (transductive batch-norm) episode is scored as the
attacked query set; intervals are over episodes for few-shot runs; vmap and the per-task loop
agree; the report names the robust number after what produced it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from metarobust.attacks import build_attack
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
from metarobust.evaluation.harness import cascade
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
    suite = summary_of({"linf/apgd-ce": 0.41, "linf/apgd-t": 0.39})
    for render in (lambda s: render_report(cfg, s, ["- trained briefly"]), lambda s: console_table({"m": s})):
        assert "PGD-10" in render(single) and "worst case" not in render(single)
        assert "worst case over the suite" in render(suite) and "after linf/apgd-ce" in render(suite)
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

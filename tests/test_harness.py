"""The evaluation harness: the cascade is a point-wise worst case, per-class accuracies add
up, and the gradient-masking checks pass on an honest model and fire on a masked one."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_classifier
from numerics import float64_copy
from torch import nn

from metarobust.attacks import build_attack
from metarobust.config import AttackConfig, ExperimentConfig
from metarobust.evaluation import classifier_unit, classifier_units, evaluate_units
from metarobust.evaluation.harness import Unit, cascade, robust_accuracy


@pytest.fixture(scope="module")
def data():
    return toy_classifier(points_per_class=50)


class Quantized(nn.Module):
    """Gradient masking by construction: rounding the input has zero gradient everywhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def config(**eval_fields) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.attack = AttackConfig(eps=0.2, steps=10, step_size=0.05)
    cfg.eval.check_points = 200
    for k, v in eval_fields.items():
        setattr(cfg.eval, k, v)
    return cfg


def units(model, x, y, batch=100):
    return list(classifier_units(model, x, y, batch))


def test_report_on_an_honest_model_passes_every_check(data):
    model, x, y = data
    report = evaluate_units(units(model, x, y), config(), 4, ["a", "b", "c", "d"])
    assert report.points == 200
    assert report.clean_acc > 0.95 and report.robust_acc < report.clean_acc
    assert list(report.after) == ["linf/pgd-10"] and report.after["linf/pgd-10"] == report.robust_acc
    assert all(c.passed for c in report.checks), report.checks
    assert {c.name for c in report.checks} >= {"more steps do not help the model",
                                              "a large eps breaks (almost) every point"}
    # per-class accuracies are consistent with the totals
    total = sum(v["points"] for v in report.per_class.values())
    robust = sum(v["robust_acc"] * v["points"] for v in report.per_class.values())
    assert total == 200 and robust / total == pytest.approx(report.robust_acc)
    sweep = [s["robust_acc"] for s in report.eps_sweep]
    assert sweep[0] == pytest.approx(report.clean_acc) and sweep[-1] < sweep[0]
    # a plain classifier's intervals are binomial over its test points
    p = report.robust_acc
    assert report.interval == "points" and report.episodes is None and report.check_points == 200
    assert report.robust_ci95 == pytest.approx(1.959964 * (p * (1 - p) / 200) ** 0.5)


def test_checks_flag_a_gradient_masking_model(data):
    model, x, y = data
    with pytest.warns(UserWarning, match="possible gradient masking"):
        report = evaluate_units(units(Quantized(model), x, y), config(), 4, list("abcd"))
    failed = {c.name for c in report.checks if not c.passed}
    assert "a large eps breaks (almost) every point" in failed


def test_cascade_is_the_pointwise_worst_case_of_its_attacks(data):
    model, x, y = data
    # The cascade attacks the survivors of the first attack as a smaller batch, whose matrix
    # products round differently from the full batch's: in float32 (~1e-7) that can flip a
    # near-tied gradient sign and so a point's outcome; in float64 the tie would have to be within
    # ~1e-14 (numerics.py).
    model, x = float64_copy(model), x.double()
    fgsm = AttackConfig(name="fgsm", eps=0.1)
    pgd = AttackConfig(eps=0.1, steps=5, step_size=0.03, random_start=False)
    unit = classifier_unit(model, x, y)
    g = torch.Generator().manual_seed(0)
    clean, robust, after = cascade(unit, [("fgsm", build_attack(fgsm)), ("pgd", build_attack(pgd))], g)
    alone = [robust_accuracy(unit, c, g)[0] for c in (fgsm, pgd)]
    assert float(robust.float().mean()) <= min(alone) + 1e-9
    assert bool((after["pgd"] <= after["fgsm"]).all())  # survivors only shrink
    assert bool((robust <= clean).all())


def test_apgd_ce_t_suite_is_at_least_as_strong_as_pgd(data):
    model, x, y = data
    pgd = evaluate_units(units(model, x, y), config(checks=False), 4, list("abcd"))
    aa = evaluate_units(units(model, x, y), config(checks=False, suite="apgd_ce_t"), 4, list("abcd"))
    assert list(aa.after) == ["linf/apgd-ce", "linf/apgd-t"]
    assert aa.robust_acc <= pgd.robust_acc + 0.01


def test_union_of_threat_models_is_no_more_robust_than_any_one(data):
    model, x, y = data
    cfg_single, cfg_union = config(checks=False), config(checks=False, union={"l2": 2.0})
    for cfg in (cfg_single, cfg_union):  # no random start: both runs attack L-inf identically
        cfg.attack.random_start = False
    single = evaluate_units(units(model, x, y), cfg_single, 4, list("abcd"))
    union = evaluate_units(units(model, x, y), cfg_union, 4, list("abcd"))
    assert list(union.after) == ["linf/pgd-10", "l2/pgd-10"]
    assert union.after["linf/pgd-10"] == single.robust_acc
    assert union.robust_acc < single.robust_acc  # L2 at 2.0 breaks points L-inf at 0.2 did not


def test_a_unit_of_several_groups_gives_each_group_its_own_verdicts(data):
    """Groups stacked in one unit (few-shot: episodes, in a loop or under vmap) are attacked
    whole; for a model that treats points independently that changes no point's verdict."""
    model, x, y = data
    pgd = [("pgd", build_attack(AttackConfig(eps=0.2, steps=10, step_size=0.05, random_start=False)))]
    g = torch.Generator().manual_seed(0)
    alone = torch.cat([cascade(classifier_unit(model, x[i : i + 50], y[i : i + 50]), pgd, g)[1]
                       for i in range(0, 200, 50)])
    assert 0 < int(alone.sum()) < 200
    for execution in ("loop", "vmap"):
        unit = Unit(lambda _, inputs: model(inputs), x.view(4, 50, 1, 8, 8), y.view(4, 50), y.view(4, 50),
                    execution=execution)
        _, robust, _ = cascade(unit, pgd, g)
        assert robust.shape == alone.shape == (4, 50) and torch.equal(robust, alone), execution


def test_masking_checks_take_the_main_pass_first_attack_as_their_base_run(data, monkeypatch):
    """With a ``single`` suite the main pass's first attack *is* the checks' base run (same points,
    attack and noise): reusing it gives the checks of a fresh base run, one attack pass fewer."""
    from metarobust.evaluation import harness

    model, x, y = data
    cfg = config()
    unit = Unit(lambda _, inputs: model(inputs), x.view(4, 50, 1, 8, 8), y.view(4, 50), y.view(4, 50))
    calls = []
    original = Unit.attacked_correct
    monkeypatch.setattr(Unit, "attacked_correct", lambda self, *a: calls.append(1) or original(self, *a))

    fresh = harness.masking_checks([unit], cfg, torch.Generator().manual_seed(0), chance=0.25)
    fresh_calls = len(calls)
    g, record = torch.Generator().manual_seed(0), []
    cascade(unit, [("pgd", build_attack(cfg.attack))], g, record)  # draws the base noise, as fresh did first
    calls.clear()
    reused = harness.masking_checks([unit], cfg, g, chance=0.25, bases=record)
    assert len(calls) == fresh_calls - 1
    assert [(c.name, c.passed, c.detail) for c in reused[0]] == [(c.name, c.passed, c.detail) for c in fresh[0]]
    assert reused[1] == fresh[1]  # the eps sweep

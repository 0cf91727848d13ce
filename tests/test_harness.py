"""The evaluation harness: the cascade is a point-wise worst case, per-class accuracies add
up, and the gradient-masking checks pass on an honest model and fire on a masked one."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_classifier
from numerics import float64_copy
from torch import nn

from metarobust.attacks import build_attack
from metarobust.attacks.harness import Unit, cascade, evaluate_units, robust_accuracy
from metarobust.config import AttackConfig, ExperimentConfig


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
    return [Unit(model, x[i : i + batch], y[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


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
    unit = Unit(model, x, y, y)
    g = torch.Generator().manual_seed(0)
    clean, robust, after = cascade(unit, [("fgsm", build_attack(fgsm)), ("pgd", build_attack(pgd))], g)
    alone = [robust_accuracy(unit, c, g)[0] for c in (fgsm, pgd)]
    assert float(robust.float().mean()) <= min(alone) + 1e-9
    assert bool((after["pgd"] <= after["fgsm"]).all())  # survivors only shrink
    assert bool((robust <= clean).all())


def test_autoattack_suite_is_at_least_as_strong_as_pgd(data):
    pytest.importorskip("metarobust.attacks.apgd")
    model, x, y = data
    pgd = evaluate_units(units(model, x, y), config(checks=False), 4, list("abcd"))
    aa = evaluate_units(units(model, x, y), config(checks=False, suite="autoattack"), 4, list("abcd"))
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

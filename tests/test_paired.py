"""Per-point verdicts in every evaluation, and paired comparisons of two models on the same points:
McNemar's exact test and the interval of the difference, consistent with each other."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import prototype_classifier

from metarobust.attacks import build_attack
from metarobust.config import AttackConfig
from metarobust.evaluation import paired_comparison, point_verdicts, robust_accuracy
from metarobust.evaluation.paired import binomial_cdf, clopper_pearson, mcnemar_exact
from metarobust.evaluation.result import binomial_ci95


def test_an_evaluation_keeps_each_points_verdicts_in_scoring_order():
    """Clean and PGD-10 verdicts per point, as one attack on every point would give them (the
    cascade attacks survivors only, with each point's own noise), through eval.json's JSON."""
    model, x, y = prototype_classifier()
    r = robust_accuracy(model, x, y, eps=0.16, suite="pgd", steps=10, step_size=0.04, seed=3)
    summary = json.loads(json.dumps(r.result.as_dict()))
    assert set(summary["verdicts"]) == {"clean", "robust", "linf/pgd-10"} and len(summary["verdicts"]["clean"]) == len(y)
    clean, robust = point_verdicts(summary, "clean"), point_verdicts(summary)
    with torch.no_grad():
        assert torch.equal(clean, model(x).argmax(1) == y)
    attack = build_attack(AttackConfig(eps=0.16, steps=10, step_size=0.04))
    noise = attack.init_noise(x[None], torch.Generator().manual_seed(3))[0]
    x_adv = attack(model, x, y, noise=noise)
    with torch.no_grad():
        assert torch.equal(robust, clean & (model(x_adv).argmax(1) == y))
    assert robust.float().mean().item() == pytest.approx(r.robust_acc) and 0 < r.robust_acc < r.clean_acc
    assert torch.equal(point_verdicts(r.result, "linf/pgd-10"), robust)
    with pytest.raises(KeyError, match="no per-point verdicts 'linf/apgd-ce'"):
        point_verdicts(summary, "linf/apgd-ce")


def test_mcnemar_and_the_interval_are_the_exact_binomial_ones():
    # 10 points only A gets right, 2 only B: p = 2 P[X <= 2], X ~ Bin(12, 1/2) = 2 (1 + 12 + 66) / 4096
    a = torch.tensor([1] * 10 + [0] * 2 + [1] * 30 + [0] * 58).bool()
    b = torch.tensor([0] * 10 + [1] * 2 + [1] * 30 + [0] * 58).bool()
    c = paired_comparison(a, b)
    assert (c.only_a, c.only_b, c.points) == (10, 2, 100) and c.difference == pytest.approx(0.08)
    assert c.p_value == pytest.approx(2 * 79 / 4096, rel=1e-12) and c.separated
    assert c.ci95[0] > 0 and c.ci95[0] < c.difference < c.ci95[1]
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)
    assert clopper_pearson(10, 10)[0] == pytest.approx(0.025 ** 0.1, rel=1e-9)
    assert binomial_cdf(3, 10, 0.3) == pytest.approx(sum(math.comb(10, i) * 0.3**i * 0.7 ** (10 - i)
                                                         for i in range(4)), rel=1e-12)
    same = paired_comparison(a, a)
    assert same.p_value == 1.0 and same.ci95 == (0.0, 0.0) and not same.separated
    assert same.as_dict()["verdict"] == "not separated" and c.as_dict()["verdict"] == "separated"


@pytest.mark.parametrize("discordant", [1, 5, 12, 40, 150])
def test_the_interval_excludes_zero_exactly_when_the_test_separates(discordant):
    for only_a in range(discordant + 1):
        a = torch.tensor([1] * only_a + [0] * (discordant - only_a) + [0] * 50).bool()
        b = torch.tensor([0] * only_a + [1] * (discordant - only_a) + [0] * 50).bool()
        c = paired_comparison(a, b)
        assert c.separated == (c.ci95[0] > 0 or c.ci95[1] < 0), (only_a, discordant, c)
        assert c.p_value == mcnemar_exact(only_a, discordant - only_a)


def test_pairing_separates_a_gap_that_two_unpaired_intervals_cannot():
    """1000 shared points, A right on 600, B on 560, B's points a subset of A's: the unpaired
    binomial intervals (about ±3 points each) overlap, the 40 discordant points all favour A."""
    a = torch.tensor([1] * 600 + [0] * 400).bool()
    b = torch.tensor([1] * 560 + [0] * 440).bool()
    (pa, ha), (pb, hb) = binomial_ci95(600, 1000), binomial_ci95(560, 1000)
    assert pa - ha < pb + hb  # the two intervals overlap
    c = paired_comparison(a, b)
    assert c.separated and c.p_value < 1e-10 and c.ci95[0] > 0.02
    with pytest.raises(ValueError, match="same N"):
        paired_comparison(a, b[:10])

"""Query-based black-box attacks behind the oracle: accounting, budgets, the threat model, no leaks."""

from __future__ import annotations

import pytest
import torch

from metarobust.attacks import APGD
from metarobust.attacks.threat import in_threat_model
from metarobust.blackbox import BLACKBOX_ATTACKS, Oracle, QueryBudgetExceeded, build_blackbox_attack
from metarobust.blackbox.report import summarise
from metarobust.blackbox.run import BlackboxConfig, attack_targets, whitebox_check
from metarobust.errors import ConfigError

NAMES = ["simba", "simba_dct", "bandits", "nes", "signhunter", "square"]
SMALL = {"bandits": {"tile": 1}}  # 8x8 toy images: one prior cell per pixel


class Counting(torch.nn.Module):
    """A target that counts the images it is sent."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.model(x)


def test_the_oracle_counts_every_image_for_its_example_and_verification_apart(toy):
    model, x, y = toy
    target = Counting(model)
    oracle = Oracle(target, budget=10, examples=3)
    oracle(x[:3])
    oracle(x[[0, 0, 2, 0]], torch.tensor([0, 0, 2, 0]))
    assert oracle.queries.tolist() == [4, 1, 2]
    assert target.images == 7
    oracle.verify(x[:3], y[:3])
    assert oracle.queries.tolist() == [4, 1, 2] and oracle.verification_queries == 3


def test_the_oracle_keeps_each_examples_last_charged_image_and_answer(toy):
    model, x, y = toy
    oracle = Oracle(model, budget=torch.tensor([3, 3, 0]), output="probs", levels=256)
    assert oracle.last is None
    images = x[[0, 1, 0]] * 0.9 + 0.001  # example 0 twice: its later image counts
    answers = oracle(images, torch.tensor([0, 1, 0]))
    points, kept, answered = oracle.last
    assert answered.tolist() == [True, True, False]
    assert torch.equal(points[:2], oracle.quantise(images[[2, 1]]))  # as the target received them
    assert torch.equal(kept[:2], answers[[2, 1]])
    with pytest.raises(QueryBudgetExceeded):
        oracle(x[2:3], torch.tensor([2]))  # refused: nothing is remembered
    oracle.verify(x[:3], y[:3])  # outside the budget: not the attacker's
    assert torch.equal(oracle.last[0][:2], points[:2]) and oracle.last[2].tolist() == [True, True, False]


def test_a_query_past_an_example_budget_is_refused_before_the_target_runs(toy):
    model, x, _ = toy
    target = Counting(model)
    oracle = Oracle(target, budget=torch.tensor([2, 5]))
    oracle(x[:2])
    oracle(x[:2])
    with pytest.raises(QueryBudgetExceeded, match=r"example\(s\) \[0\].*budget \[2\]"):
        oracle(x[:2])
    assert oracle.queries.tolist() == [2, 2] and target.images == 4
    oracle(x[1:2], torch.tensor([1]))  # the other example still has budget


def test_a_stopped_example_keeps_its_count_and_gets_no_more_queries(toy):
    model, x, _ = toy
    oracle = Oracle(Counting(model), budget=5, examples=2)
    oracle(x[:2])
    oracle.stop(torch.tensor([True, False]))
    assert oracle.remaining.tolist() == [0, 4] and oracle.queries.tolist() == [1, 1]
    with pytest.raises(QueryBudgetExceeded):
        oracle(x[:1], torch.tensor([0]))
    oracle(x[1:2], torch.tensor([1]))
    with pytest.raises(ValueError, match="a flag per example"):
        oracle.stop(torch.tensor([True]))


def test_no_gradient_reaches_the_input_through_the_oracle(toy):
    model, x, _ = toy
    for output in ("probs", "logits", "label"):
        oracle = Oracle(model, 1, len(x), output=output)
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            out = oracle(xg)
        assert not out.requires_grad and out.grad_fn is None
        with pytest.raises(RuntimeError):
            out.float().sum().backward()
        assert xg.grad is None
    assert not hasattr(Oracle(model, 1), "parameters")


def test_the_oracle_refuses_images_outside_the_box_without_charging(toy):
    model, x, _ = toy
    oracle = Oracle(model, 5, len(x))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle(x + 2)
    assert int(oracle.queries.sum()) == 0


def test_a_quantising_oracle_ignores_sub_quantum_changes(toy):
    model, x, y = toy
    oracle = Oracle(model, 10, len(x), output="logits", levels=256)
    wiggle = (0.45 / 255) * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1)
    assert torch.equal(oracle(x), oracle((x + wiggle).clamp(0, 1)))
    for name in NAMES:  # an eps below one quantum leaves nothing to change
        oracle = Oracle(model, 200, len(x), levels=256)
        out = build_blackbox_attack(name, "linf", 0.9 / 255, **SMALL.get(name, {}))(oracle, x, y)
        assert torch.equal(out.x_adv, x) and not out.success.any(), name


@pytest.mark.parametrize("name", NAMES)
def test_query_counts_are_exact_and_every_budget_holds(toy, name):
    model, x, y = toy
    budget = torch.tensor([0, 1, 2, 3, 7, 60, 150, 400] * 3)[:len(x)]
    target = Counting(model)
    oracle = Oracle(target, budget, output="probs", levels=256)
    out = build_blackbox_attack(name, "linf", 0.25, **SMALL.get(name, {}))(oracle, x, y)
    assert (out.queries <= budget).all()
    assert int(out.queries.sum()) == target.images  # every image the target saw is charged once
    assert torch.equal(out.queries, oracle.queries)
    assert out.queries[0] == 0 and not out.success[0]  # no budget, no query
    # an example stops at its first success: the verdict was paid for and holds on re-query
    assert torch.equal(oracle.verify(out.x_adv, y)[out.success], out.success[out.success])


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.5)])
def test_every_output_is_in_the_eps_ball_in_the_box_and_on_the_8_bit_grid(toy, norm, eps):
    model, x, y = toy
    for name in NAMES:
        oracle = Oracle(model, 300, len(x), levels=256)
        out = build_blackbox_attack(name, norm, eps, **SMALL.get(name, {}))(oracle, x, y)
        assert in_threat_model(x, out.x_adv, norm, eps).all(), name
        assert torch.allclose(out.x_adv * 255, (out.x_adv * 255).round(), atol=1e-3), name


def test_score_attacks_refuse_a_label_only_oracle(toy):
    model, x, y = toy
    for name in NAMES:
        with pytest.raises(ConfigError, match="score-based"):
            build_blackbox_attack(name, "linf", 0.1)(Oracle(model, 10, len(x), output="label"), x, y)


def test_black_box_attacks_do_not_beat_white_box_apgd_on_the_same_points(toy):
    model, x, y = toy
    eps = 0.2
    apgd = APGD("linf", eps, steps=50)
    white = (model(apgd(model, x, y, noise=apgd.init_noise(x, torch.Generator().manual_seed(0)))).argmax(-1) != y)
    wins = {}
    for name in NAMES:
        oracle = Oracle(model, 1000, len(x), levels=256)
        out = build_blackbox_attack(name, "linf", eps, **SMALL.get(name, {}))(oracle, x, y)
        wins[name] = float(oracle.verify(out.x_adv, y).float().mean())
        assert wins[name] <= float(white.float().mean()) + 0.1, (name, wins[name])
    assert max(wins.values()) > 0.3  # the attacks do work on this non-robust model
    summary = {"attacks": {n: {"success_rate": r} for n, r in wins.items()}}
    ok = torch.ones(len(x), dtype=torch.bool)
    assert whitebox_check([(model, x, y, False)], [ok], "linf", eps, summary)["passed"]
    summary["attacks"]["fake"] = {"success_rate": 1.0}
    check = whitebox_check([(model, x, y, False)], [ok], "linf", 0.05, summary)
    assert not check["passed"] and "fake" in check["masking_suspects"]


def test_statistics_take_the_median_over_query_counts_and_fasr_over_every_attacked_point():
    queries = torch.tensor([1, 3, 10, 50, 100, 100])
    claimed = torch.tensor([True, True, True, False, False, True])
    verified = torch.tensor([True, True, True, False, False, False])
    s = summarise(queries, claimed, verified, budget=100)
    assert s["attacked"] == 6 and s["successes"] == 3 and s["success_rate"] == 0.5
    assert s["median_queries"] == 3.0 and s["mean_queries"] == pytest.approx(14 / 3)
    assert s["fasr"] == pytest.approx(1 / 6) and s["fasr_of_successes"] == pytest.approx(1 / 3)
    assert s["claimed_not_verified"] == 1 and sum(s["histogram"]["counts"]) == 3
    assert s["curve"][-1] == [100, 0.5]


def test_a_batch_coupled_target_scores_each_image_inside_its_clean_batch(toy):
    model, x, _ = toy

    def coupled(batch):  # the answer depends on the batch mean, as transductive batch norm
        return model(batch - batch.mean(0, keepdim=True) + 0.5)

    oracle = Oracle(coupled, 5, len(x), output="logits", context=x)
    probe = (x[3] * 0 + 1).unsqueeze(0)
    replaced = x.clone()
    replaced[3] = probe[0]
    assert torch.allclose(oracle(probe, torch.tensor([3]))[0], coupled(replaced)[3], atol=1e-5)
    assert oracle.queries.tolist()[3] == 1 and int(oracle.queries.sum()) == 1


def test_attack_targets_reports_every_attack_over_the_clean_correct_points(toy):
    model, x, y = toy
    y = y.clone()
    y[0] = (y[0] + 1) % 4  # a clean error: never attacked, never charged
    cfg = BlackboxConfig(run="toy", attacks=["signhunter", "simba"], budget=100, whitebox_check=True)
    s = attack_targets(cfg, [(model, x, y, False)], eps=0.2)
    assert s["clean_acc"] == pytest.approx((len(x) - 1) / len(x))
    for name in ("signhunter", "simba"):
        r = s["attacks"][name]
        assert r["attacked"] == len(x) - 1 and r["verification_queries"] == len(x)
        assert r["mean_queries"] is None or r["mean_queries"] <= 100
    assert "whitebox" in s


def test_black_box_attacks_are_listed_and_unknown_names_fail_with_the_choices(capsys):
    from metarobust.cli import main

    assert set(NAMES) <= set(BLACKBOX_ATTACKS.names())
    main(["list", "attacks"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES)
    with pytest.raises(ConfigError, match="simba"):
        build_blackbox_attack("square_bb", "linf", 0.1)
    with pytest.raises(ConfigError, match="norm"):
        build_blackbox_attack("signhunter", "l1", 0.1)


def test_metarobust_blackbox_attacks_a_few_shot_run_and_writes_table_json_and_plot(tmp_path, capsys):
    import json
    from pathlib import Path

    from metarobust.cli import main
    from metarobust.experiment import load_config, train_and_evaluate

    configs = Path(__file__).resolve().parents[1] / "configs"
    small = ["model.hidden=8", "meta.meta_batch_size=2", "meta.queries=2", "meta.test_inner_steps=1",
             "train.iterations=2", "train.checkpoint_every=2", "eval.episodes=2", "eval.batch_size=2",
             "eval.check_points=4", "eval.checks=false", "eval.eps_sweep=[]", "recipe=maml", "name=bb",
             f"out_dir={tmp_path}"]
    run = Path(train_and_evaluate(load_config(configs / "quickstart.yaml", small), progress=False)["run"])
    capsys.readouterr()
    code = main(["blackbox", str(configs / "blackbox" / "glyphs_linf.yaml", ), f"run={run}", "episodes=2",
                 "budget=30", "attacks=[signhunter,nes]", "params={}", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    headline = json.loads(out.strip().splitlines()[-1])
    assert set(headline) >= {"signhunter", "nes", "clean_acc", "budget"} and headline["budget"] == 30
    saved = json.loads((run / "blackbox" / "blackbox.json").read_text())
    assert saved["groups"] == 2 and saved["points"] == 20  # 2 episodes of 5-way 2-query
    assert (run / "blackbox" / "blackbox.png").stat().st_size > 0 and "whitebox" in saved
    assert all(r["attacked"] == round(saved["clean_acc"] * 20) for r in saved["attacks"].values())
    code = main(["attack", "blackbox", str(configs / "blackbox" / "glyphs_linf.yaml"), f"run={run}", "episodes=2",
                 "budget=30", "attacks=[signhunter]", "params={}", "whitebox_check=false", "--quiet"])
    again = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])  # the spelling: the same command
    assert code == 0 and again["signhunter"] == headline["signhunter"]

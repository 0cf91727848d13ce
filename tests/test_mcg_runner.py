"""MCG in the runner: the seeded attacks' query accounting, the generator checkpoint, the mcg config."""

from __future__ import annotations

import copy

import pytest
import torch

from metarobust.blackbox import Oracle, build_blackbox_attack
from metarobust.blackbox.mcg import GeneratorConfig, History, MCGAttack, MCGConfig, MCGGenerator
from metarobust.blackbox.mcg.checkpoint import load_generator, save_generator
from metarobust.blackbox.run import (
    BlackboxConfig,
    MCGSection,
    attack_targets,
    load_blackbox_config,
    mcg_attacks,
    seeded_attack,
    seeded_variant,
)
from metarobust.errors import ConfigError

TINY = {"levels": 2, "steps": 2, "hidden": 8, "x_hidden_channels": 4, "x_hidden_size": 8}
EPS = 0.5
FOOLS_SOME = MCGConfig(glow_steps=3, glow_lr=0.05, glow_interpolation=1.0, finetune_clean=False,
                       finetune_perturbation=False)
"""Large generator steps on a surrogate equal to the toy target: the proposal fools about half."""


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_generator(eps: float = EPS) -> MCGGenerator:
    torch.manual_seed(0)
    g = MCGGenerator(GeneratorConfig((1, 8, 8), "linf", eps, **TINY))
    with torch.no_grad():  # a fresh flow is a permutation; move the weights so samples vary with x
        for p in g.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=seeded(1)))
    return g


def mcg_for(toy, cfg: MCGConfig = FOOLS_SOME) -> MCGAttack:
    return MCGAttack("linf", EPS, tiny_generator(), [copy.deepcopy(toy[0])], cfg, History())


class Recording:
    """Wraps a callable and keeps what it returned last."""

    def __init__(self, call):
        self.call, self.result = call, None

    def __call__(self, *args, **kwargs):
        self.result = self.call(*args, **kwargs)
        return self.result


@pytest.mark.parametrize("name", ["simba", "simba_dct", "bandits", "nes", "signhunter", "square"])
def test_a_seeded_example_spends_one_proposal_query_plus_the_attacks_own_within_its_budget(toy, name):
    model, x, y = toy
    budget = torch.full((len(x),), 40)
    budget[0], budget[1] = 0, 1  # no query at all; the proposal only
    oracle = Oracle(model, budget=budget, examples=len(x), output="probs", levels=256)
    mcg = mcg_for(toy)
    mcg.propose = Recording(mcg.propose)
    attack = Recording(build_blackbox_attack(name, "linf", EPS, **({"tile": 1} if name == "bandits" else {})))
    outcome = seeded_attack(attack, mcg, oracle, x, y, seeded(0), seeded(1))
    proposal, own = mcg.propose.result, attack.result
    assert proposal.queries.tolist() == [0] + [1] * (len(x) - 1)
    assert torch.equal(outcome.queries, proposal.queries + own.queries)
    assert torch.equal(outcome.queries, oracle.queries) and bool((oracle.queries <= budget).all())
    won = proposal.success
    assert 0 < int(won.sum()) < len(x), "the toy setting should fool some points with the proposal, not all"
    assert outcome.queries[won].tolist() == [1] * int(won.sum())  # fooled by the proposal: stops at 1
    assert bool(outcome.success[won].all())
    assert torch.equal(outcome.success, oracle.verify(outcome.x_adv, y))


@pytest.mark.parametrize("name", ["simba", "bandits", "nes", "signhunter", "square"])
def test_an_answer_already_held_for_the_seed_point_is_not_bought_again(toy, name):
    model, x, y = toy
    params = {"tile": 1} if name == "bandits" else {}
    attack = build_blackbox_attack(name, "linf", EPS, **params)
    init = EPS * torch.sign(torch.randn(x.shape, generator=seeded(3))) * torch.rand(x.shape, generator=seeded(4))
    saved = 0 if name == "signhunter" else 1  # its first point is x + eps sign(init), not the seed point
    runs = {}
    for holds in (False, True):  # the held answer's run has one query less to spend: the same walk
        oracle = Oracle(model, budget=30 - saved * holds, examples=len(x), output="probs", levels=256)
        xq = oracle.quantise(x)
        point = attack.point(oracle, xq, init)  # the seed point, as the attack sends it
        scores = Oracle(model, budget=1, examples=len(x), output="probs", levels=256)(point)  # paid elsewhere
        known = (point, scores) if holds else None
        runs[holds] = attack(oracle, x, y, seeded(0), init=init, known=known)
    plain, held = runs[False], runs[True]
    assert torch.equal(held.queries, plain.queries - saved)
    assert torch.equal(held.success, plain.success) and torch.equal(held.x_adv, plain.x_adv)


def test_the_runner_reports_each_attack_with_and_without_mcg_and_the_query_ratio(toy):
    model, x, y = toy
    cfg = BlackboxConfig(run="toy", attacks=["signhunter"], budget=30, eps=EPS, whitebox_check=False)
    mcg = mcg_for(toy, MCGConfig(glow_steps=3, glow_lr=0.05, glow_interpolation=1.0))
    s = attack_targets(cfg, [(model, x, y, False)], EPS, mcg=[mcg])
    plain, seeded_row = s["attacks"]["signhunter"], s["attacks"]["mcg+signhunter"]
    assert plain["attacked"] == seeded_row["attacked"] == len(x)
    assert seeded_row["fasr"] > 0 and seeded_row["histogram"]["counts"][0] >= round(seeded_row["fasr"] * len(x))
    row = s["mcg"]["comparison"]["signhunter"]
    assert row["mcg_fasr"] == seeded_row["fasr"] and row["query_ratio"] == pytest.approx(
        seeded_row["mean_queries"] / plain["mean_queries"])
    # the history: every proposal, then the downstream attack's last point where it queried
    downstream = len(x) - round(seeded_row["fasr"] * len(x))
    assert downstream > 0
    assert mcg.history.size("clean") == len(x) and mcg.history.size("attack") == len(x) + downstream


def test_test_fasr_runs_the_proposal_alone_as_one_row_of_one_query_per_point(toy):
    model, x, y = toy
    cfg = BlackboxConfig(run="toy", attacks=["signhunter"], budget=30, eps=EPS, whitebox_check=False)
    mcg = mcg_for(toy, MCGConfig(glow_steps=3, glow_lr=0.05, glow_interpolation=1.0, test_fasr=True))
    s = attack_targets(cfg, [(model, x, y, False)], EPS, mcg=[mcg])
    assert set(s["attacks"]) == {"mcg", "signhunter"}
    row = s["attacks"]["mcg"]
    assert row["attacked"] == len(x) and row["mean_queries_all"] == 1.0 and 0 < row["success_rate"] < 1
    assert row["fasr"] == row["success_rate"]  # one query: every success is a first-query success


def test_a_generator_checkpoint_round_trips_to_identical_samples(tmp_path):
    g = tiny_generator()
    path = save_generator(tmp_path / "g.pt", g, {"surrogates": ["runs/a"], "stage": 2})
    loaded, info = load_generator(path)
    x = torch.rand(3, 1, 8, 8, generator=seeded(2))
    assert loaded.cfg == g.cfg and info == {"surrogates": ["runs/a"], "stage": 2}
    assert torch.equal(loaded.sample(x, seeded(5)), g.sample(x, seeded(5)))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_generator(tmp_path / "bad.pt")


def test_bad_mcg_fields_fail_with_the_field_the_value_and_the_fix(tmp_path):
    def section(**kw):
        return BlackboxConfig(run="toy", mcg=MCGSection(enabled=True, **kw))

    with pytest.raises(ConfigError, match="mcg.generator is empty"):
        section().check()
    with pytest.raises(ConfigError, match="no such file"):
        section(generator=str(tmp_path / "none.pt"), surrogates=["x"]).check()
    path = str(save_generator(tmp_path / "g.pt", tiny_generator()))
    with pytest.raises(ConfigError, match="surrogates is empty"):
        section(generator=path).check()
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['glow_stpes'\]"):
        section(generator=path, surrogates=[path], config={"glow_stpes": 1}).check()
    cfg = section(generator=path, surrogates=[path])
    cfg.output = "label"
    with pytest.raises(ConfigError, match="scores"):
        cfg.check()
    cfg.output, cfg.targeted = "probs", True
    with pytest.raises(ConfigError, match="untargeted"):
        cfg.check()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="eps=0.3"):  # the generator bounds to 0.5
        mcg_attacks(cfg.mcg, [(None, x, None, False)], "linf", 0.3)
    with pytest.raises(ConfigError, match="norm='l2'"):
        mcg_attacks(cfg.mcg, [(None, x, None, False)], "l2", EPS)
    yaml = tmp_path / "bb.yaml"
    yaml.write_text(f"run: toy\nmcg:\n  enabled: true\n  generator: {path}\n  surrogates: [{path}]\n"
                    f"  config: {{glow_steps: 1, confidence: [0.2, 1.0]}}\n")
    loaded = load_blackbox_config(yaml)
    assert loaded.mcg.mcg_config().glow_steps == 1 and loaded.mcg.mcg_config().confidence == (0.2, 1.0)


def test_square_seeded_by_mcg_takes_the_released_codes_p_init_and_shifted_schedule():
    from metarobust.attacks.square import p_selection

    square = build_blackbox_attack("square", "linf", EPS)
    seeded_square = seeded_variant(square, MCGConfig())
    assert (seeded_square.p_init, seeded_square.schedule_offset) == (0.3, 500)
    assert (square.p_init, square.schedule_offset) == (None, 0)  # the plain run's attack is untouched
    # its first iteration draws squares of 0.3 / 8 of the image: the schedule's step after 200
    assert p_selection(0.3, 0 + seeded_square.schedule_offset, 10_000, False) == pytest.approx(0.3 / 8)
    kept = seeded_variant(square, MCGConfig(square_p_init=None, square_schedule_offset=None))
    assert kept == square
    signhunter = build_blackbox_attack("signhunter", "linf", EPS)
    assert seeded_variant(signhunter, MCGConfig()) is signhunter
    with pytest.raises(ConfigError, match="square_p_init=1.5"):
        MCGConfig(square_p_init=1.5)
    with pytest.raises(ConfigError, match="square_schedule_offset=-1"):
        MCGConfig(square_schedule_offset=-1)


def test_cg_attack_pays_a_population_per_generation_within_budget_and_stays_in_the_ball(toy):
    """CG-Attack (CMA-ES over the generator latent): exact counts (the seed's known answer is not
    bought again; then ``popsize`` a generation, a last partial one where the budget ends), every
    point in the eps-ball, the box and on the grid, and paid verdicts that hold on re-query."""
    from metarobust.attacks.threat import in_threat_model
    from metarobust.blackbox import CGAttack

    model, x, y = toy
    flow = tiny_generator()
    budget = torch.tensor([0, 1, 5, 21, 45] + [60] * (len(x) - 5))
    for seeded_start, start in ((False, "mode"), (True, "mode"), (True, "proposal")):
        oracle = Oracle(model, budget=budget, examples=len(x), output="probs", levels=256)
        init = known = None
        if seeded_start:
            init = flow.sample(x, seeded(7))
            point = CGAttack("linf", EPS).point(oracle, oracle.quantise(x), init)
            scores = Oracle(model, budget=1, examples=len(x), output="probs", levels=256)(point)  # paid elsewhere
            known = (point, scores)
        attack = CGAttack("linf", EPS, popsize=4, start=start).bind(flow)
        out = attack(oracle, x, y, seeded(0), init=init, known=known)
        assert torch.equal(out.queries, oracle.queries) and bool((out.queries <= budget).all())
        assert out.queries[0] == 0 and not out.success[0]
        first = 0 if seeded_start else 1  # the seed point's answer is held; the plain start is bought
        for i in range(len(x)):
            spent = int(out.queries[i])
            if not out.success[i] and budget[i] > 0:  # ran to the end: the whole budget went
                assert spent == budget[i], (i, spent)
            if spent > first:  # after the first query, whole generations of 4 except a last partial one
                assert out.success[i] or (spent - first) % 4 == 0 or spent == budget[i]
        assert bool(in_threat_model(x, out.x_adv, "linf", EPS).all())
        assert torch.allclose(out.x_adv * 255, (out.x_adv * 255).round(), atol=1e-3)
        assert torch.equal(oracle.verify(out.x_adv, y)[out.success], out.success[out.success])
        assert int(out.success.sum()) > 0


def test_cg_needs_mcg_and_runs_plain_and_seeded_in_the_runner(toy):
    from metarobust.blackbox import CGAttack

    model, x, y = toy
    with pytest.raises(ConfigError, match="'cg'.*mcg.enabled is false"):
        BlackboxConfig(run="toy", attacks=["cg"], budget=30, eps=EPS, whitebox_check=False).check()
    with pytest.raises(ConfigError, match="enable blackbox.mcg"):
        CGAttack("linf", EPS)(Oracle(model, budget=5, examples=len(x)), x, y)
    with pytest.raises(ConfigError, match="eps=0.1"):
        CGAttack("linf", 0.1).bind(tiny_generator())(Oracle(model, budget=5, examples=len(x)), x, y)
    with pytest.raises(ConfigError, match="start='middle'"):
        CGAttack("linf", EPS, start="middle")
    cfg = BlackboxConfig(run="toy", attacks=["cg"], budget=30, eps=EPS, whitebox_check=False,
                         params={"cg": {"popsize": 4}})
    mcg = mcg_for(toy)
    s = attack_targets(cfg, [(model, x, y, False)], EPS, mcg=[mcg])
    assert set(s["attacks"]) == {"cg", "mcg+cg"}
    for row in s["attacks"].values():
        assert row["attacked"] == len(x) and row["success_rate"] > 0

"""``metarobust blackbox CONFIG``: query-based attacks on a trained run, table, JSON and plot.

The target is a trained run's deployed model. For a few-shot recipe it is the learner fine-tuned
on each frozen test episode's support set (:func:`~metarobust.evaluation.fewshot.adapted_episodes`),
and the oracle answers for that episode's query set; for a plain classifier it is the model on
the run's test points. Only the points the target classifies correctly are attacked (the others
get a budget of 0). With ``whitebox_check`` APGD attacks the same points with gradients, and a
black-box attack that beats it by more than sampling noise is reported as a sign of gradient
masking (a black-box attack is a special case of a white-box one).

With ``mcg.enabled`` every attack also runs as ``mcg+<attack>`` on the same points with the same
budget and seed: MCG's generator spends the example's first query on its proposal
(:meth:`~metarobust.blackbox.mcg.MCGAttack.propose`, the same oracle), and the attack starts from
it (``init=proposal.delta``) on the examples the proposal did not fool; an example's count is 1
plus the attack's own, never past the budget. One :class:`MCGAttack` per target keeps its
history (the clean answers, then every proposal's answer) across the attacks. Its surrogates
are the target's kind: for a classifier, plain classifier runs (copies); for a few-shot target,
meta-learner runs each fine-tuned on the group's episode's support set
(:mod:`~metarobust.blackbox.mcg.fewshot`, docs/blackbox.md "MCG on few-shot targets").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarobust.attacks import APGD
from metarobust.blackbox.base import BLACKBOX_ATTACKS
from metarobust.blackbox.oracle import OUTPUTS, Oracle
from metarobust.blackbox.report import blackbox_headline, blackbox_table, plot_success_vs_queries, summarise
from metarobust.errors import ConfigError


@dataclass
class MCGSection:
    """``mcg:`` of a blackbox config: seed every attack with MCG's generator (docs/blackbox.md)."""

    enabled: bool = False
    generator: str = ""
    """A generator checkpoint (``metarobust blackbox-train``): its norm and eps must be the run's."""
    surrogates: list[str] = field(default_factory=list)
    """Run folders or checkpoints of white-box surrogates, refreshed at attack time (copies)."""
    config: dict[str, Any] = field(default_factory=dict)
    """:class:`~metarobust.blackbox.mcg.MCGConfig` fields overriding its defaults, e.g.
    ``{finetune_clean: false, glow_steps: 1}``."""

    def check(self) -> None:
        if not self.enabled:
            return
        if not self.generator:
            raise ConfigError("blackbox.mcg.generator is empty; name a generator checkpoint "
                              "(metarobust blackbox-train writes one)")
        if not Path(self.generator).is_file():
            raise ConfigError(f"blackbox.mcg.generator={self.generator!r}: no such file; train one with "
                              f"metarobust blackbox-train")
        if not self.surrogates:
            raise ConfigError("blackbox.mcg.surrogates is empty; name at least one surrogate run folder or "
                              "checkpoint (runs/<name>)")
        for path in self.surrogates:
            if not Path(path).exists():
                raise ConfigError(f"blackbox.mcg.surrogates: {path!r} does not exist; expected a run folder "
                                  f"or a checkpoint")
        self.mcg_config()

    def mcg_config(self):
        """The :class:`MCGConfig` of ``config``; unknown fields name the accepted ones."""
        from metarobust.blackbox.mcg import MCGConfig
        from metarobust.blackbox.mcg.config import known_fields

        return MCGConfig(**known_fields(MCGConfig, self.config, "blackbox.mcg.config"))


@dataclass
class BlackboxConfig:
    """A ``configs/blackbox/*.yaml`` file; defaults are the common score-based protocol."""

    run: str = ""
    """The target: a run folder (``runs/<name>``) or a checkpoint file."""
    attacks: list[str] = field(default_factory=lambda: ["simba", "simba_dct", "bandits", "nes", "signhunter", "square"])
    """Black-box attacks in order (``metarobust list attacks``)."""
    norm: str = "linf"
    eps: float | None = None
    """Radius; ``null``: the run's ``attack.eps`` (L-inf) or 0.5 (L2)."""
    budget: int = 1000
    """Queries per attacked example."""
    targeted: bool = False
    """Targeted mode: each point gets a random class other than its label (seeded by ``seed``,
    the same targets for every attack) and succeeds only when classified as it."""
    output: str = "probs"
    """What the oracle returns: probs, logits or label."""
    levels: int | None = 256
    """Quantise every query to this many grey levels (8-bit); null: none."""
    episodes: int = 5
    """Few-shot targets: the first episodes of the run's frozen test manifest."""
    points: int = 100
    """Classifier targets: test points."""
    seed: int = 0
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-attack settings overriding the papers' defaults, e.g. ``{bandits: {tile: 2}}``."""
    whitebox_check: bool = True
    """Run APGD-CE (100 steps) on the same points and flag a black-box attack beating it."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of the run's own config (e.g. ``[device=cpu]``)."""
    out: str | None = None
    """Folder for blackbox.json and blackbox.png; ``null``: ``<run>/blackbox``."""
    mcg: MCGSection = field(default_factory=MCGSection)
    """MCG's generator as the first query of every attack (``mcg+<attack>`` rows)."""

    def __post_init__(self) -> None:
        if isinstance(self.mcg, dict):  # from YAML (OmegaConf.to_container) or a plain dict
            self.mcg = MCGSection(**self.mcg)

    def check(self) -> None:
        if not self.run:
            raise ConfigError("blackbox.run is empty; name a run folder or checkpoint (runs/<name>)")
        for name in self.attacks:
            BLACKBOX_ATTACKS.get(name, "blackbox.attacks")
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"blackbox.norm={self.norm!r}; choose linf or l2")
        if self.output not in OUTPUTS:
            raise ConfigError(f"blackbox.output={self.output!r}; choose one of {list(OUTPUTS)}")
        if self.budget < 1 or self.episodes < 1 or self.points < 1:
            raise ConfigError(f"blackbox.budget={self.budget}, episodes={self.episodes}, points={self.points} "
                              f"must be >= 1")
        for name in self.params:  # settings of attacks not run are kept (attacks=[...] on the command line)
            BLACKBOX_ATTACKS.get(name, "blackbox.params")
        self.mcg.check()
        if "cg" in self.attacks and not self.mcg.enabled:
            raise ConfigError("blackbox.attacks has 'cg' (CG-Attack: CMA-ES over MCG's generator latent) but "
                              "blackbox.mcg.enabled is false; enable mcg with a generator, or drop 'cg'")
        if self.mcg.enabled and self.output == "label":
            raise ConfigError("blackbox.mcg.enabled with output='label': MCG refreshes its surrogates on the "
                              "target's scores; use output probs or logits")
        if self.mcg.enabled and self.targeted:
            raise ConfigError("blackbox.mcg.enabled with targeted=true: MCG's proposal is untargeted "
                              "(its generator was trained on the margin of the true class); set targeted=false")


def load_blackbox_config(path: str | Path, overrides: list[str] | None = None) -> BlackboxConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides; checked."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(BlackboxConfig), OmegaConf.load(path),
                             OmegaConf.from_dotlist(overrides or []))
    cfg = BlackboxConfig(**OmegaConf.to_container(merged))
    cfg.check()
    return cfg


@dataclass
class TargetEpisodes:
    """A few-shot target's episodes, one per group (:func:`targets`): what MCG's surrogate
    learners are fine-tuned on (their support sets), and the dataset they come from."""

    dataset: str
    episodes: list
    """:class:`~metarobust.data.episode.Episode` per group, in the groups' order."""

    @property
    def ways(self) -> int:
        return self.episodes[0].ways


def targets(cfg: BlackboxConfig):
    """``(run config, [(forward, x, y, coupled)], episodes)``: the run's deployed model on its
    test points, one group per episode (few-shot) or one for the classifier's points;
    ``episodes`` (:class:`TargetEpisodes`) are the few-shot groups' episodes, ``None`` for a
    classifier."""
    from metarobust.evaluation.classifier import evaluation_points
    from metarobust.evaluation.fewshot import adapted_episodes
    from metarobust.evaluation.harness import batch_coupled
    from metarobust.experiment import model_from_checkpoint, resolve_manifest
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    run_cfg, model, _ = model_from_checkpoint(cfg.run, cfg.overrides)
    recipe = build_recipe(run_cfg)
    test = load_training_data(run_cfg, recipe, resolve_device(run_cfg.device)).test
    out, episodes = [], None
    if recipe.evaluation == "classifier":
        index = evaluation_points(test, cfg.points)
        x = test.images[index].float() / 255
        out.append((model, x, test.labels[index], batch_coupled(model)))
    else:
        frozen = Path(cfg.run) / "episodes.json"  # episodes the run froze for itself, if it had to
        if not run_cfg.eval.manifest and frozen.is_file():
            run_cfg.eval.manifest = str(frozen)
        manifest = resolve_manifest(run_cfg, test)
        learner = recipe.evaluation_learner(model, manifest.ways)
        coupled = batch_coupled(model)
        episodes = TargetEpisodes(run_cfg.data.dataset, [])
        for i, (forward, episode, _) in enumerate(adapted_episodes(model, test, manifest, run_cfg, learner)):
            if i >= cfg.episodes:
                break
            out.append((forward, episode.query_x, episode.query_y, coupled))
            episodes.episodes.append(episode)
    return run_cfg, out, episodes


def attack_targets(cfg: BlackboxConfig, groups, eps: float, progress=None, mcg=None,
                   episodes: TargetEpisodes | None = None) -> dict[str, Any]:
    """Run every attack of ``cfg`` on ``groups`` (``[(forward, x, y, coupled)]``); the summary.

    With ``cfg.mcg.enabled`` (or ``mcg``: one :class:`~metarobust.blackbox.mcg.MCGAttack` per
    group, built by :func:`mcg_attacks` when not given, with the few-shot target's ``episodes``)
    each attack also runs seeded by MCG's proposal (:func:`seeded_attack`) as ``mcg+<attack>``,
    from the same random state; with ``mcg.config.test_fasr`` the proposal alone runs instead,
    as one row ``mcg`` (one query per point: its success rate is MCG's FASR)."""
    from metarobust.blackbox import build_blackbox_attack
    from metarobust.blackbox.report import mcg_comparison

    clean, answers = [], []
    for f, x, y, coupled in groups:  # the clean check: one query per point, outside the budgets
        check = Oracle(f, 1, len(x), cfg.output, cfg.levels, x if coupled else None)
        scores = check(x)
        clean.append((scores if cfg.output == "label" else scores.argmax(-1)) == y)
        answers.append((check.quantise(x), scores))
    correct = torch.cat(clean).cpu()
    summary: dict[str, Any] = {"norm": cfg.norm, "eps": eps, "budget": cfg.budget, "output": cfg.output,
                               "levels": cfg.levels, "targeted": cfg.targeted, "points": len(correct),
                               "clean_acc": float(correct.float().mean()), "attacks": {}}
    if mcg is None and cfg.mcg.enabled:
        mcg = mcg_attacks(cfg.mcg, groups, cfg.norm, eps, episodes)
    if mcg is not None:
        for attack, (x_seen, scores), (_, _, y, _) in zip(mcg, answers, groups, strict=True):
            attack.history.add(x_seen, y, scores, cfg.output, kind="clean")  # answers the clean check paid for
        summary["mcg"] = {"generator": cfg.mcg.generator, "surrogates": list(cfg.mcg.surrogates),
                          "config": dict(cfg.mcg.config),
                          "adapted_per_episode": episodes is not None}  # few-shot: surrogates fitted per support set
    chooser = torch.Generator().manual_seed(cfg.seed)
    goals = [random_targets(f, x, y, chooser) if cfg.targeted else None for f, x, y, _ in groups]
    generator = torch.Generator().manual_seed(cfg.seed)
    proposal_rng = torch.Generator().manual_seed(cfg.seed)
    fasr_only = mcg is not None and mcg[0].cfg.test_fasr
    rows = []  # (label, attack or None for MCG's proposal alone, seeders, random generator)
    if fasr_only:  # test_fasr: MCG's first query alone, the paper's FASR protocol
        rows.append(("mcg", None, mcg, proposal_rng))
    for name in cfg.attacks:
        attack = build_blackbox_attack(name, cfg.norm, eps, **cfg.params.get(name, {}))
        start = generator.get_state()
        rows.append((name, attack, None, generator))
        if mcg is not None and not fasr_only:  # the same random state as the plain run
            rows.append((f"mcg+{name}", attack, mcg, torch.Generator().set_state(start)))
    for label, attack, seeders, rng in rows:
        queries, claimed, verified, spent = [], [], [], 0
        for i, ((forward, x, y, coupled), ok, y_target) in enumerate(zip(groups, clean, goals)):
            oracle = Oracle(forward, cfg.budget * ok.long(), len(x), cfg.output, cfg.levels, x if coupled else None)
            run = attack.bind(mcg[i].generator) if hasattr(attack, "bind") else attack  # CG: this target's
            if seeders is None:
                outcome = run(oracle, x, y, rng, y_target=y_target)
            elif run is None:
                outcome = seeders[i](oracle, x, y, rng)
            else:
                outcome = seeded_attack(run, seeders[i], oracle, x, y, rng, proposal_rng)
            verdict = oracle.verify(outcome.x_adv, y, target=y_target)
            queries.append(outcome.queries[ok])
            claimed.append(outcome.success[ok])
            verified.append(verdict[ok])
            spent += oracle.verification_queries
        summary["attacks"][label] = summarise(torch.cat(queries), torch.cat(claimed), torch.cat(verified), cfg.budget)
        summary["attacks"][label]["verification_queries"] = spent
        if progress:
            progress(label, summary["attacks"][label])
    if mcg is not None:
        summary["mcg"]["comparison"] = mcg_comparison(summary)
    if cfg.whitebox_check:
        summary["whitebox"] = whitebox_check(groups, clean, cfg.norm, eps, summary, cfg.seed)
    return summary


def seeded_variant(attack, cfg):
    """``attack`` as MCG hands over to it (META.md 3.4 step 5): Square with ``cfg.square_p_init``
    and ``cfg.square_schedule_offset`` where they are set (the released code's 0.3 and 500); any
    other attack as it is (it starts from the proposal through ``init``)."""
    from metarobust.blackbox.square import QuerySquare

    if not isinstance(attack, QuerySquare):
        return attack
    changes = {"p_init": cfg.square_p_init, "schedule_offset": cfg.square_schedule_offset}
    return dataclasses.replace(attack, **{k: v for k, v in changes.items() if v is not None})


def seeded_attack(attack, mcg, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                  proposal_rng: torch.Generator):
    """``mcg+<attack>`` on one oracle: MCG's one charged proposal per example with budget
    (``mcg.propose``, drawing from ``proposal_rng``), then ``attack`` (as :func:`seeded_variant`
    hands over to it) from ``init=proposal.delta``
    on the examples it did not fool (those that it fooled get no budget left, so they stop with
    exactly 1 query); then the attack's last point per example and the target's answer to it join
    MCG's history (:meth:`~metarobust.blackbox.mcg.MCGAttack.remember`). Returns the combined
    :class:`~metarobust.blackbox.Outcome`: queries are the proposal's plus the attack's, success
    either's, ``x_adv`` the proposal where it won."""
    from metarobust.blackbox import Outcome

    attack = seeded_variant(attack, mcg.cfg)
    proposal = mcg.propose(oracle, x, y, proposal_rng)
    won = proposal.success.cpu()
    oracle.stop(won)  # a fooled example stops here, with its one query
    outcome = attack(oracle, x, y, generator, init=proposal.delta, known=(proposal.x_adv, proposal.scores))
    mcg.remember(oracle, y, outcome.queries > 0)  # the attack's last points and answers join the history
    won = won.to(x.device)
    x_adv = torch.where(won.view(-1, *([1] * (x.dim() - 1))), proposal.x_adv, outcome.x_adv)
    return Outcome(x_adv, proposal.queries.to(x.device) + outcome.queries, won | outcome.success)


def mcg_attacks(section: MCGSection, groups, norm: str, eps: float, episodes: TargetEpisodes | None = None) -> list:
    """One :class:`~metarobust.blackbox.mcg.MCGAttack` per group (target), each with its own
    surrogates (refreshed in place) and its own history; the generator must have been trained
    for this norm, eps and image shape.

    A classifier target (``episodes=None``): copies of plain classifier runs that score the
    target's classes. A few-shot target (``episodes``, one per group): meta-learner runs of its
    dataset and ``ways``, each fine-tuned on the group's episode's support set
    (:func:`~metarobust.blackbox.mcg.fewshot.adapt_surrogates`). Any other pairing is a
    :class:`ConfigError` naming ``blackbox.mcg.surrogates`` and the fix."""
    from metarobust.blackbox.mcg import History, MCGAttack
    from metarobust.blackbox.mcg.checkpoint import load_generator
    from metarobust.blackbox.mcg.fewshot import adapt_surrogates, check_fewshot_surrogates, surrogate_learners

    device = groups[0][1].device
    generator, _ = load_generator(section.generator, device)
    g = generator.cfg
    if g.norm != norm or not math.isclose(g.eps, eps, rel_tol=1e-6, abs_tol=1e-9):
        raise ConfigError(f"blackbox.mcg.generator={section.generator!r} was trained for norm={g.norm!r}, "
                          f"eps={g.eps:.6g}; this run attacks norm={norm!r}, eps={eps:.6g}: set blackbox norm/eps "
                          f"to the generator's or train one for this threat model")
    shape = tuple(groups[0][1].shape[1:])
    if tuple(g.shape) != shape:
        raise ConfigError(f"blackbox.mcg.generator={section.generator!r} generates {tuple(g.shape)} perturbations; "
                          f"the target's images are {shape}")
    cfg = section.mcg_config()
    runs = surrogate_learners(section.surrogates, device=str(device),
                              ways=episodes.ways if episodes is not None else None)
    if episodes is not None:
        check_fewshot_surrogates(runs, episodes.dataset, episodes.ways, "blackbox.mcg.surrogates")
        if len(episodes.episodes) != len(groups):
            raise ValueError(f"{len(episodes.episodes)} episodes for {len(groups)} groups; give one per group")
        return [MCGAttack(norm, eps, copy.deepcopy(generator), adapt_surrogates(runs, e.support_x, e.support_y), cfg,
                          History()) for e in episodes.episodes]
    for run in runs:
        if run.kind != "classifier":
            raise ConfigError(f"blackbox.mcg.surrogates: {run.path!r} is a few-shot learner (recipe "
                              f"{run.cfg.recipe!r}) and the target a plain classifier scoring global classes; "
                              f"name plain classifier runs of the target's dataset")
    surrogates = [run.model for run in runs]
    forward, x = groups[0][0], groups[0][1][:1]
    with torch.no_grad():
        classes = forward(x).shape[-1]
        for path, s in zip(section.surrogates, surrogates, strict=True):
            if s(x).shape[-1] != classes:
                raise ConfigError(f"blackbox.mcg.surrogates: {path!r} scores {s(x).shape[-1]} classes, the "
                                  f"target {classes}; a surrogate must share the target's classes")
    return [MCGAttack(norm, eps, copy.deepcopy(generator), [copy.deepcopy(s) for s in surrogates], cfg, History())
            for _ in groups]


def random_targets(forward, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A target per example ``[B]``: a class other than its label ``y``, uniform over the
    others, from ``generator``. (The number of classes is read from one clean forward.)"""
    with torch.no_grad():
        classes = forward(x).shape[-1]
    shift = torch.randint(1, classes, y.shape, generator=generator)
    return (y.cpu() + shift).remainder(classes).to(y.device)


def whitebox_check(groups, clean, norm: str, eps: float, summary: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """APGD-CE (100 steps, white-box) on the same points, and per black-box attack whether its
    success rate exceeds APGD's by more than noise (two binomial standard errors of the pooled
    rate, and at least one point): a failed check suggests gradient masking. (Untargeted APGD
    also bounds a targeted attack's rate: reaching a target is one way to be misclassified.)"""
    apgd = APGD(norm, eps, steps=100)
    generator = torch.Generator().manual_seed(seed)
    broken = []
    for (forward, x, y, _), ok in zip(groups, clean):
        x_adv = apgd(forward, x, y, noise=apgd.init_noise(x, generator).to(x.device))
        with torch.no_grad():
            broken.append(((forward(x_adv).argmax(-1) != y) & ok).cpu()[ok.cpu()])
    broken = torch.cat(broken)
    attacked = max(len(broken), 1)
    rate = float(broken.float().mean()) if len(broken) else 0.0
    out = {"attack": "apgd-ce-100", "success_rate": rate, "passed": True, "masking_suspects": []}
    for name, r in summary["attacks"].items():
        pooled = (rate + r["success_rate"]) / 2
        noise = max(2 * math.sqrt(2 * pooled * (1 - pooled) / attacked), 1 / attacked)
        if r["success_rate"] > rate + noise:
            out["masking_suspects"].append(name)
            out["passed"] = False
    return out


def run_blackbox(cfg: BlackboxConfig, progress=None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Attack the run of ``cfg``; write ``blackbox.json`` and ``blackbox.png``; the summary and paths."""
    from metarobust.runs import atomic_write_text

    run_cfg, groups, episodes = targets(cfg)
    eps = cfg.eps if cfg.eps is not None else (run_cfg.attack.eps if cfg.norm == "linf" else 0.5)
    summary = attack_targets(cfg, groups, eps, progress, episodes=episodes)
    summary["target"] = cfg.run
    summary["recipe"] = run_cfg.recipe
    summary["dataset"] = run_cfg.data.dataset
    summary["groups"] = len(groups)
    out = Path(cfg.out) if cfg.out else (Path(cfg.run) if Path(cfg.run).is_dir() else Path(cfg.run).parent) / "blackbox"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "blackbox.json"
    atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
    mode = "targeted, " if cfg.targeted else ""
    title = (f"{run_cfg.recipe} on {run_cfg.data.dataset}: {mode}{cfg.norm} eps {eps:.3g}, "
             f"{summary['points']} points, clean acc {100 * summary['clean_acc']:.0f}%")
    plot = plot_success_vs_queries(summary, out / "blackbox.png", title)
    return summary, {"json": json_path, "plot": plot}


__all__ = ["BlackboxConfig", "MCGSection", "TargetEpisodes", "attack_targets", "blackbox_headline", "blackbox_table",
           "load_blackbox_config", "mcg_attacks", "random_targets", "run_blackbox", "seeded_attack", "targets",
           "whitebox_check"]

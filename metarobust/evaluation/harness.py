"""The robust-evaluation harness: an attack suite, the union of threat models, per-class
accuracies, a robust-accuracy-vs-eps sweep and gradient-masking checks.

It runs the suite ``eval.suite`` (:data:`SUITE_NAMES`: the ``attack`` section alone by default;
``autoattack``, the standard AutoAttack of Croce & Hein, ICML 2020, with the reference's settings
per norm, :func:`autoattack_configs`) and the checklist of Carlini et al. ("On Evaluating
Adversarial Robustness", 2019):

- **Cascade**: the attacks of a suite run in a fixed order and each attacks only the points
  still robust; a point is robust if it is classified correctly clean and after every attack,
  so the reported robust accuracy is the point-wise worst case over the suite (and over the
  threat models of ``eval.union``). The accuracy after each attack is logged, as AutoAttack does.
- **Checks** (on by default, reported as warnings): more steps or restarts never raise robust
  accuracy; robust accuracy falls to about zero at a large epsilon; the attack raises the loss
  more than random noise of the same size; robust accuracy never rises with epsilon.

The harness works on *units*: ``T`` groups of ``B`` points, each group scored by its own model
(:class:`Unit`). For a plain classifier a unit is one group, a batch of test images, scored by
the model in eval mode. For a few-shot learner a unit is a batch of ``eval.batch_size`` frozen
episodes: group ``t`` is episode ``t``'s query set, scored at the weights fitted on its support
set, and the groups run in a per-task loop or under ``torch.func.vmap`` (``meta.execution``), as
in training.

**Coupled groups.** When a model's prediction for one input depends on the other inputs of its
batch (MAML's transductive batch norm, :class:`~metarobust.models.layers.TaskBatchNorm2d`), a
point's robustness is defined only within its attacked group. Every attack then perturbs the
whole group, and a point survives it if it is classified correctly *in the attacked group, as
the attack left it*, and in every query set the attack scored on its way: PGD's restarts and
APGD's iterates are whole attacked batches, while the per-point best they return is a mixture no
run produced, in which another point's change can un-fool a point (``verdict=True`` of the
attacks, :meth:`Unit.attacked_correct`). (The harness once kept, per point, the first input that fooled it and
re-scored that mixture of adversarial and clean inputs: a batch no attack had optimised, whose
statistics lie nearer the clean ones. It read up to about two points more robust than scoring
the attacked query set, and disagreed with the few-shot evaluation at the end of training.)

**Noise.** Each attack's random start is drawn for every point of a unit (``attack.init_noise``
on ``[T, B, C, H, W]``), whatever survived the attacks before, so the draws depend only on the
seed, the points and their grouping (``eval.batch_size`` episodes for few-shot units).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.func import vmap

from metarobust.attacks import build_attack
from metarobust.config import AttackConfig, ExperimentConfig
from metarobust.errors import ConfigError
from metarobust.evaluation.result import CheckResult, EvalResult, binomial_ci95, encode_verdicts, mean_ci95
from metarobust.meta.functional import FunctionalForward, Params
from metarobust.models.layers import TaskBatchNorm2d


@dataclass
class Unit:
    """What the harness attacks: ``T`` groups of ``B`` points, each group with its own model.

    Args:
        forward: ``forward(weights, x [B, C, H, W]) -> logits [B, K]``, one group's model at
            ``{**shared, **weights_t}``.
        x: ``[T, B, C, H, W]`` in [0, 1]; y: ``int64 [T, B]`` labels; classes: ``int64 [T, B]``,
            the class of each point for per-class accuracies (e.g. a store's class ids).
        weights: tensors that differ per group, stacked on dim 0 (a few-shot episode's fast
            weights); empty when every group has the same model.
        shared: tensors every group uses as they are (the parameters adaptation left alone).
        coupled: a group's predictions depend on all its points (transductive batch norm):
            attacks perturb whole groups, never slices.
        execution: ``"loop"`` (group by group) or ``"vmap"`` (all groups in one vectorised call).
        adversarial: optional, a tensor like ``x`` (e.g. a copy of it): the cascade writes into it
            each point's adversarial input from the attack that first broke it (a coupled
            group's point: its input in the group as that attack left it); the other points
            keep what it held.

    A plain classifier is one group: :func:`~metarobust.evaluation.classifier.classifier_unit`.
    """

    forward: FunctionalForward
    x: torch.Tensor
    y: torch.Tensor
    classes: torch.Tensor
    weights: Params = field(default_factory=dict)
    shared: Params = field(default_factory=dict)
    coupled: bool = False
    execution: str = "loop"
    adversarial: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.x.shape[0]

    @property
    def points(self) -> int:
        return self.y.numel()

    def map(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:
        """``fn(forward_t, *args_t)`` for every group ``t``, stacked on dim 0: ``forward_t`` is
        group ``t``'s model (``x -> logits``), ``args`` have the group dimension first (or are
        ``None``)."""

        def one(weights: Params, *a: torch.Tensor | None) -> torch.Tensor:
            params = {**self.shared, **weights}
            return fn(lambda x: self.forward(params, x), *a)

        if self.execution == "vmap" and self.groups > 1:
            in_dims = (0, *(None if a is None else 0 for a in args))
            return vmap(one, in_dims=in_dims, randomness="error")(self.weights, *args)
        out = [one({k: v[t] for k, v in self.weights.items()}, *(None if a is None else a[t] for a in args))
               for t in range(self.groups)]
        if isinstance(out[0], tuple):  # several outputs per group, each stacked
            return tuple(torch.stack(parts) for parts in zip(*out))
        return torch.stack(out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, B, ...] -> logits [T, B, K]``, each group through its own model."""
        return self.map(lambda f, xt: f(xt), x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(x).argmax(dim=-1)

    def attack(self, attack, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """``attack`` on every group against its own model; ``noise`` from ``attack.init_noise(x)``."""
        return self.map(lambda f, xt, yt, nt: attack(f, xt, yt, noise=nt), x, y, noise)

    def attacked_correct(self, attack, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_adv, correct [T, B])``: ``attack`` on every group, and whether each point survived it.

        A point of an uncoupled group survives if ``x_adv`` is classified correctly. An attack with
        restarts or a best-iterate rule (PGD, APGD) returns, per point, its best input: for a
        coupled group that is a mixture of batches no run produced, and in it another point's
        change can un-fool a point that a whole attacked batch fooled. So a coupled point
        survives only if it is correct in ``x_adv`` *and* in every batch the attack scored
        (``verdict=True``, :attr:`~metarobust.attacks.pgd.PGD.verdicts`): the worst case over
        real attacked query sets, never better than scoring ``x_adv`` alone.
        """
        if self.coupled and getattr(attack, "verdicts", False):
            x_adv, fooled = self.map(lambda f, xt, yt, nt: attack(f, xt, yt, noise=nt, verdict=True), x, y, noise)
            return x_adv, (self.predict(x_adv) == y) & ~fooled
        x_adv = self.attack(attack, x, y, noise)
        return x_adv, self.predict(x_adv) == y

    def head(self, points: int) -> Unit:
        """The unit cut to about ``points`` points: the first points of a single uncoupled
        group, else the first whole groups that hold them (a group is one model's batch)."""
        if self.groups == 1 and not self.coupled:
            return replace(self, x=self.x[:, :points], y=self.y[:, :points], classes=self.classes[:, :points])
        t = min(self.groups, math.ceil(points / self.y.shape[1]))
        return replace(self, x=self.x[:t], y=self.y[:t], classes=self.classes[:t],
                       weights={k: v[:t] for k, v in self.weights.items()})


def batch_coupled(model: torch.nn.Module) -> bool:
    """Whether ``model``'s prediction for an input depends on the other inputs of its batch:
    batch norm with the batch's statistics (:class:`~metarobust.models.layers.TaskBatchNorm2d`
    always, torch's batch norm in training mode)."""
    return any(isinstance(m, TaskBatchNorm2d) or (m.training and isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
               for m in model.modules())


SUITE_NAMES = {
    "single": "the attack section",
    "autoattack": "AutoAttack standard",
    "apgd_ce_t": "AutoAttack's APGD-CE + APGD-T subset",
    "autoattack_reference": "the reference AutoAttack (pyautoattack, standard)",
}
"""What each ``eval.suite`` runs, as reports name it."""


def autoattack_configs(base: AttackConfig, num_classes: int, standard: bool = True
                       ) -> list[tuple[str, AttackConfig]]:
    """AutoAttack's standard version in ``base.norm`` at ``base.eps`` with the reference's settings
    (``AutoAttack._set_version('standard')`` of ``pyautoattack``): APGD-CE (100 steps; 1 restart,
    L1 5), APGD-T (100 steps, 1 restart; 9 target classes, L1 5), FAB-T (100 steps, 1 restart,
    9 target classes) and Square (5000 queries, ``p_init`` 0.8). ``standard=False``: the first two
    only (``apgd_ce_t``). Target classes are capped at ``num_classes - 1``; APGD-T needs 4
    classes and is skipped below (with a warning)."""
    norm, l1 = base.norm, base.norm == "l1"
    out = [(f"{norm}/apgd-ce", replace(base, name="apgd", steps=100, restarts=5 if l1 else 1, loss="ce",
                                       targeted=False))]
    if num_classes >= 4:  # targeted DLR needs the 4 largest logits
        out.append((f"{norm}/apgd-t", replace(base, name="apgd_t", steps=100, restarts=1, loss="dlr", targeted=True,
                                              target_classes=min(5 if l1 else 9, num_classes - 1))))
    else:
        warnings.warn(f"apgd-t skipped: targeted DLR needs >= 4 classes, got {num_classes}", stacklevel=3)
    if not standard:
        return out
    out.append((f"{norm}/fab-t", replace(base, name="fab_t", steps=100, restarts=1, targeted=True,
                                         target_classes=min(9, num_classes - 1))))
    out.append((f"{norm}/square", replace(base, name="square", restarts=1)))
    return out


def suite_configs(cfg: ExperimentConfig, num_classes: int) -> list[tuple[str, AttackConfig]]:
    """``(label, attack config)`` in cascade order, over every threat model of the evaluation
    (``eval.suite``: :data:`SUITE_NAMES`)."""
    threat_models = [(cfg.attack.norm, cfg.attack.eps)]
    threat_models += [(n, e) for n, e in cfg.eval.union.items() if (n, e) != threat_models[0]]
    out = []
    for norm, eps in threat_models:
        base = replace(cfg.attack, norm=norm, eps=eps)
        if norm != cfg.attack.norm:  # a step size tuned for one norm means nothing in another
            base = replace(base, step_size=2.5 * eps / base.steps)
        if cfg.eval.suite == "single":
            out.append((f"{norm}/{base.name}-{base.steps}", base))
        elif cfg.eval.suite == "autoattack_reference":
            out.append((f"{norm}/autoattack-reference", replace(base, name="autoattack_reference")))
        else:
            out += autoattack_configs(base, num_classes, standard=cfg.eval.suite == "autoattack")
    return out


@dataclass
class BaseRun:
    """The first attack of a cascade run on *every* point of a unit (whole groups): its noise, its
    adversarial inputs and which points survived it, ``[T, B, ...]``. When that attack is the
    ``attack`` section itself, the masking checks take it as their base run instead of attacking
    the same points with the same attack a second time (:func:`masking_checks`)."""

    noise: torch.Tensor | None
    x_adv: torch.Tensor
    survived: torch.Tensor

    def head(self, groups: int) -> BaseRun:
        return BaseRun(None if self.noise is None else self.noise[:groups], self.x_adv[:groups],
                       self.survived[:groups])


def cascade(unit: Unit, attacks: list[tuple[str, Callable]], generator: torch.Generator,
            record: list[BaseRun] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``attacks`` in order on the points still robust.

    Returns ``clean_correct [T, B]``, ``robust [T, B]`` (bool, after the whole cascade) and the
    robust mask after each attack. A single uncoupled group attacks only its survivors; other
    units attack whole groups (survivors cannot be sliced out of a coupled group or out of
    groups stacked for ``vmap``) and, for uncoupled models, give the same verdicts per point.
    ``record``: a list that gets the first attack's :class:`BaseRun` when it attacked whole
    groups (nothing is appended otherwise).
    """
    clean_correct = unit.predict(unit.x) == unit.y
    robust = clean_correct.clone()
    after = {}
    for i, (name, attack) in enumerate(attacks):
        noise = attack.init_noise(unit.x, generator)  # for every point: the draws never depend on survivors
        whole = unit.coupled or unit.groups > 1
        if bool(robust.any()) or (whole and i == 0 and record is not None):
            if whole:
                x_adv, survived = unit.attacked_correct(attack, unit.x, unit.y, noise)
                if i == 0 and record is not None:
                    record.append(BaseRun(noise, x_adv, survived))
                fooled = robust & ~survived
                robust &= survived
                if unit.adversarial is not None:
                    unit.adversarial[fooled] = x_adv[fooled]
            else:
                idx = robust[0].nonzero().squeeze(1)
                x_adv = unit.attack(attack, unit.x[:, idx], unit.y[:, idx], None if noise is None else noise[:, idx])
                robust[0, idx] = (unit.predict(x_adv) == unit.y[:, idx])[0]
                if unit.adversarial is not None:
                    fooled = ~robust[0, idx]
                    unit.adversarial[0, idx[fooled]] = x_adv[0, fooled]
        after[name] = robust.clone()
    return clean_correct, robust, after


def robust_accuracy(unit: Unit, attack_cfg: AttackConfig, generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """Accuracy under one attack on all points (no cascade), and the adversarial inputs."""
    attack = build_attack(attack_cfg)
    x_adv, correct = unit.attacked_correct(attack, unit.x, unit.y, attack.init_noise(unit.x, generator))
    return float(correct.float().mean()), x_adv


def large_eps(norm: str, dim: int) -> float:
    """A radius at which any image can be moved to a uniform grey: robust accuracy must be ~0."""
    return {"linf": 0.5, "l2": 0.5 * math.sqrt(dim), "l1": 0.5 * dim}[norm]


def masking_checks(units: list[Unit], cfg: ExperimentConfig, generator: torch.Generator,
                   chance: float, bases: list[BaseRun] | None = None) -> tuple[list[CheckResult], list[dict[str, float]]]:
    """Carlini et al.'s sanity checks on ``units`` (a few hundred points), and the eps sweep.

    ``bases``: one :class:`BaseRun` of the ``attack`` section per unit, from the main pass (the
    first attack of a ``single`` suite on the same points): reused as the checks' base run
    (noise, adversarial inputs, verdicts) instead of a second identical attack."""
    a = cfg.attack
    tol = 0.02  # two points of accuracy: sampling noise of a few hundred points and restarts
    total = sum(u.points for u in units)

    def attacked(attack_cfg: AttackConfig, noises: list[torch.Tensor | None] | None = None
                 ) -> tuple[float, list[torch.Tensor]]:
        attack = build_attack(attack_cfg)
        correct, inputs = 0, []
        for i, u in enumerate(units):
            noise = noises[i] if noises is not None else attack.init_noise(u.x, generator)
            x_adv, survived = u.attacked_correct(attack, u.x, u.y, noise)
            inputs.append(x_adv)
            correct += int(survived.sum())
        return correct / total, inputs

    def mean_acc(attack_cfg: AttackConfig, noises: list[torch.Tensor | None] | None = None) -> float:
        return attacked(attack_cfg, noises)[0]

    # Paired comparisons: the stronger attack starts from the same random points as the base
    # one (its first restart *is* the base run), so only the attack, not the draw, can differ.
    checks = []
    if bases is not None and len(bases) == len(units):
        base_noise = [b.noise for b in bases]
        base_inputs = [b.x_adv for b in bases]
        base = sum(int(b.survived.sum()) for b in bases) / total
    else:
        base_noise = [build_attack(a).init_noise(u.x, generator) for u in units]
        base, base_inputs = attacked(a, base_noise)
    more_steps = mean_acc(replace(a, steps=4 * a.steps, step_size=a.step_size / 2), base_noise)
    checks.append(CheckResult("more steps do not help the model", more_steps <= base + tol,
                              f"{a.steps} steps: {100 * base:.1f}%, {4 * a.steps} steps: {100 * more_steps:.1f}%"))
    if a.random_start:
        triple = replace(a, restarts=3 * a.restarts)
        noises = [nest_restarts(n, build_attack(triple).init_noise(u.x, generator), u.x, 3)
                  for n, u in zip(base_noise, units)]
        restarts = mean_acc(triple, noises)
        checks.append(CheckResult("restarts do not help the model", restarts <= base + tol,
                                  f"{a.restarts} restart(s): {100 * base:.1f}%, {3 * a.restarts} restarts: "
                                  f"{100 * restarts:.1f}%"))
    big = large_eps(a.norm, units[0].x[0, 0].numel())
    huge = mean_acc(replace(a, eps=big, steps=max(a.steps, 20), step_size=big / 8))
    checks.append(CheckResult("a large eps breaks (almost) every point", huge <= min(0.05, chance),
                              f"{a.norm} eps={big:.3g}: {100 * huge:.1f}% robust (must be <= "
                              f"{100 * min(0.05, chance):.0f}%)"))
    attack_loss = random_loss = 0.0
    with torch.no_grad():
        for u, x_adv in zip(units, base_inputs):
            noise = random_perturbation(u.x, a.norm, a.eps, generator)
            attack_loss += float(F.cross_entropy(u.logits(x_adv).flatten(0, 1), u.y.flatten(), reduction="sum"))
            random_loss += float(F.cross_entropy(u.logits(noise).flatten(0, 1), u.y.flatten(), reduction="sum"))
    checks.append(CheckResult("the attack beats random noise of the same size", attack_loss > random_loss,
                              f"mean CE: attack {attack_loss / total:.3f}, random {random_loss / total:.3f}"))
    sweep = []
    for multiple in sorted(cfg.eval.eps_sweep):
        eps = min(multiple * a.eps, 1.0) if a.norm == "linf" else multiple * a.eps
        if multiple == 1:  # the base attack itself
            acc = base
        elif eps > 0:
            acc = mean_acc(replace(a, eps=eps, step_size=a.step_size * multiple))
        else:
            acc = sum(int((u.predict(u.x) == u.y).sum()) for u in units) / total
        sweep.append({"eps": eps, "robust_acc": acc})
    accs = [s["robust_acc"] for s in sweep]
    monotone = all(b <= a_ + tol for a_, b in zip(accs, accs[1:]))
    checks.append(CheckResult("robust accuracy never rises with eps", monotone,
                              ", ".join(f"{s['eps']:.3g}: {100 * s['robust_acc']:.1f}%" for s in sweep)))
    for c in checks:
        if not c.passed:
            warnings.warn(f"possible gradient masking: {c.name} FAILED ({c.detail})", stacklevel=2)
    return checks, sweep


def nest_restarts(first: torch.Tensor | None, more: torch.Tensor, x: torch.Tensor, factor: int) -> torch.Tensor:
    """Random-start noise for an attack with ``factor`` times the restarts whose first restart of
    every run is the one ``first`` holds: a point fooled with ``first`` stays fooled.

    Noise is ``x.shape`` (one run) or ``[*x.shape, runs]``; runs are ordered ``target * restarts
    + restart`` (:class:`metarobust.attacks.apgd.APGD`), so each target's first restart is set.
    """
    if first is None:
        return more
    runs = first.shape[-1] if first.dim() > x.dim() else 1
    nested = more.reshape(*x.shape, runs, -1).clone()
    nested[..., 0] = first.reshape(*x.shape, runs)
    return nested.reshape(more.shape)


def random_perturbation(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A random point on the sphere of radius ``eps`` (corners for L-inf) around each image of
    ``x [..., C, H, W]``, clipped to [0, 1]."""
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    flat = g.flatten(x.dim() - 3)
    if norm == "linf":
        d = eps * g.sign()
    elif norm == "l2":
        d = eps * (flat / flat.norm(dim=-1, keepdim=True)).view_as(x)
    else:
        d = eps * (flat / flat.abs().sum(dim=-1, keepdim=True)).view_as(x)
    return (x + d).clamp(0, 1)


def evaluate_units(units: Iterable[Unit], cfg: ExperimentConfig, num_classes: int, class_names: list[str],
                   progress: Callable[[Iterable], Iterable] | None = None, interval: str = "points"
                   ) -> EvalResult:
    """Clean and robust accuracy of every unit under the suite of ``cfg``; checks and the eps
    sweep on the first ``eval.check_points`` points (when ``eval.checks``).

    Args:
        units: the points and their models (:func:`~metarobust.evaluation.fewshot.fewshot_units`,
            :func:`~metarobust.evaluation.classifier.classifier_units`).
        cfg: ``attack``, ``eval`` (suite, union, checks, check_points, eps_sweep) and ``seed``
            (the attack noise's generator).
        num_classes: classes a point can be given (the ways of an episode): chance and the
            targets of APGD-T.
        class_names: names of the ``classes`` ids of the units, for per-class accuracies.
        progress: an optional wrapper of the unit iterator (e.g. ``tqdm``).
        interval: ``"episodes"``: each group is an episode and intervals are over episodes;
            ``"points"``: binomial intervals over points (:class:`EvalResult`).

    Returns: the :class:`~metarobust.evaluation.result.EvalResult` (metadata from ``cfg``; no
    ``run`` or ``step``).
    """
    generator = None
    configs = suite_configs(cfg, num_classes)
    attacks = [(name, build_attack(c)) for name, c in configs]
    counts = {"clean": 0, "robust": 0, **{name: 0 for name, _ in attacks}}
    per_group: dict[str, list[torch.Tensor]] = {k: [] for k in counts}
    per_point: dict[str, list[torch.Tensor]] = {k: [] for k in counts}
    total = 0
    per_class = torch.zeros(3, len(class_names))  # points, clean, robust
    check_units: list[Unit] = []
    check_points = 0
    # The checks' base run is the ``attack`` section; when the suite starts with that very attack,
    # the main pass's first attack on whole groups is that run (same points, attack and noise).
    reusable = cfg.eval.checks and configs[0][1] == cfg.attack
    bases: list[BaseRun] | None = [] if reusable else None
    with torch.no_grad():  # the attacks differentiate inside (torch.enable_grad / torch.func.grad)
        for unit in (progress(units) if progress else units):
            if generator is None:
                generator = torch.Generator(device=unit.x.device)
                generator.manual_seed(cfg.seed)
            if unit.coupled and cfg.eval.suite == "autoattack_reference":
                raise ConfigError("eval.suite=autoattack_reference: the reference AutoAttack attacks slices of a "
                                  "batch, but this model's predictions couple its batch (transductive batch norm); "
                                  "use eval.suite=autoattack")
            wanted = cfg.eval.checks and check_points < cfg.eval.check_points
            record: list[BaseRun] | None = [] if wanted and bases is not None else None
            clean_correct, robust, after = cascade(unit, attacks, generator, record)
            total += unit.points
            for key, mask in {"clean": clean_correct, "robust": robust, **after}.items():
                counts[key] += int(mask.sum())
                per_group[key].append(mask.float().mean(dim=1).cpu())
                per_point[key].append(mask.flatten().cpu())
            cls = unit.classes.flatten().cpu()
            for row, weights in enumerate((None, clean_correct, robust)):
                w = None if weights is None else weights.flatten().cpu().float()
                per_class[row] += torch.bincount(cls, weights=w, minlength=len(class_names)).float()
            if wanted:
                check_units.append(unit.head(cfg.eval.check_points - check_points))
                check_points += check_units[-1].points
                if bases is not None and record:  # whole groups: head() keeps the first groups
                    bases.append(record[0].head(check_units[-1].groups))
                else:
                    bases = None  # a unit attacked survivors only: the checks run their own base
        checks, sweep = [], []
        if check_units and cfg.attack.eps > 0:
            checks, sweep = masking_checks(check_units, cfg, generator, chance=1 / num_classes, bases=bases)
        else:
            check_points = 0
    if interval == "episodes":
        stats = {k: mean_ci95(torch.cat(v)) for k, v in per_group.items()}
    else:
        stats = {k: binomial_ci95(v, total) for k, v in counts.items()}
    names = [name for name, _ in attacks]
    classes = {class_names[i]: {"points": int(per_class[0, i]), "clean_acc": float(per_class[1, i] / per_class[0, i]),
                                "robust_acc": float(per_class[2, i] / per_class[0, i])}
               for i in torch.nonzero(per_class[0] > 0).flatten().tolist()}
    return EvalResult(
        clean_acc=stats["clean"][0], clean_ci95=stats["clean"][1],
        robust_acc=stats["robust"][0], robust_ci95=stats["robust"][1],
        after={n: stats[n][0] for n in names}, after_ci95={n: stats[n][1] for n in names},
        interval=interval, points=total,
        episodes=sum(len(v) for v in per_group["clean"]) if interval == "episodes" else None,
        per_class=classes, checks=checks, eps_sweep=sweep, check_points=check_points,
        verdicts={k: encode_verdicts(torch.cat(v)) for k, v in per_point.items() if v},
        recipe=cfg.recipe, dataset=cfg.data.dataset, suite=cfg.eval.suite, norm=cfg.attack.norm,
        eps=cfg.attack.eps)

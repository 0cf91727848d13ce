"""The robust-evaluation harness: an attack suite, the union of threat models, per-class
accuracies, a robust-accuracy-vs-eps sweep and gradient-masking checks.

It follows the AutoAttack protocol (Croce & Hein, ICML 2020) and the checklist of Carlini et al.
("On Evaluating Adversarial Robustness", 2019):

- **Cascade**: the attacks of a suite run in a fixed order and each attacks only the points
  still robust; a point's final input is the first that fooled the model, so the reported
  robust accuracy is the point-wise worst case over the suite (and over the threat models of
  ``eval.union``). The accuracy after each attack is logged, as AutoAttack does.
- **Checks** (on by default, reported as warnings): more steps or restarts never raise robust
  accuracy; robust accuracy falls to about zero at a large epsilon; the attack raises the loss
  more than random noise of the same size; robust accuracy never rises with epsilon.

The harness works on *units*: a forward function plus the points it scores. For a plain
classifier a unit is a batch of test images and ``forward`` is the model in eval mode. For a
few-shot learner a unit is one frozen episode: ``forward`` is the model at the weights adapted on
the episode's support set, and the points are its query set. Models whose prediction for one
input depends on the others in the batch (MAML's transductive batch norm) are ``coupled``: then
every attack sees the whole query batch and survivors are selected by masking, not slicing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from metarobust.attacks import build_attack
from metarobust.config import AttackConfig, ExperimentConfig

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Unit:
    """What the harness attacks: ``forward`` on points ``x [B, C, H, W]`` with labels ``y [B]``;
    ``classes [B]`` names the class of each point for per-class accuracies."""

    forward: Forward
    x: torch.Tensor
    y: torch.Tensor
    classes: torch.Tensor
    coupled: bool = False


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass
class RobustnessReport:
    """Accuracies in [0, 1] over all points. ``after`` lists the robust accuracy after each
    attack of the cascade (``"linf/apgd-ce"``...), the last entry being ``robust_acc``."""

    points: int
    clean_acc: float
    robust_acc: float
    after: dict[str, float]
    per_class: dict[str, dict[str, float]]
    eps_sweep: list[dict[str, float]] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def suite_configs(cfg: ExperimentConfig, num_classes: int) -> list[tuple[str, AttackConfig]]:
    """``(label, attack config)`` in cascade order, over every threat model of the evaluation."""
    threat_models = [(cfg.attack.norm, cfg.attack.eps)]
    threat_models += [(n, e) for n, e in cfg.eval.union.items() if (n, e) != threat_models[0]]
    out = []
    for norm, eps in threat_models:
        base = replace(cfg.attack, norm=norm, eps=eps)
        if norm != cfg.attack.norm:  # a step size tuned for one norm means nothing in another
            base = replace(base, step_size=2.5 * eps / base.steps)
        if cfg.eval.suite == "single":
            out.append((f"{norm}/{base.name}-{base.steps}", base))
            continue
        out.append((f"{norm}/apgd-ce", replace(base, name="apgd", steps=100, loss="ce", targeted=False)))
        if num_classes >= 4:  # targeted DLR needs the 4 largest logits
            targets = min(9, num_classes - 1)
            out.append((f"{norm}/apgd-t", replace(base, name="apgd_t", steps=100, loss="dlr", targeted=True,
                                                  target_classes=targets)))
        else:
            warnings.warn(f"apgd-t skipped: targeted DLR needs >= 4 classes, got {num_classes}", stacklevel=2)
    return out


def predict(unit: Unit, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return unit.forward(x).argmax(dim=-1)


def cascade(unit: Unit, attacks: list[tuple[str, Callable]], generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``attacks`` in order on the points still robust.

    Returns ``clean_correct [B]``, ``robust [B]`` (bool, after the whole cascade) and the robust
    mask after each attack.
    """
    x_cur = unit.x.clone()
    clean_correct = predict(unit, unit.x) == unit.y
    robust = clean_correct.clone()
    after = {}
    for name, attack in attacks:
        if bool(robust.any()):
            if unit.coupled:
                # Attack the whole batch (its statistics shape every prediction); keep the new
                # input only where a still-robust point is fooled.
                noise = attack.init_noise(x_cur, generator)
                x_adv = attack(unit.forward, unit.x, unit.y, noise=noise)
                candidate = torch.where(robust.view(-1, 1, 1, 1), x_adv, x_cur)
                fooled = robust & (predict(unit, candidate) != unit.y)
                x_cur = torch.where(fooled.view(-1, 1, 1, 1), x_adv, x_cur)
                robust = predict(unit, x_cur) == unit.y
                robust &= clean_correct
            else:
                idx = robust.nonzero().squeeze(1)
                noise = attack.init_noise(unit.x[idx], generator)
                x_adv = attack(unit.forward, unit.x[idx], unit.y[idx], noise=noise)
                still = predict(unit, x_adv) == unit.y[idx]
                x_cur[idx[~still]] = x_adv[~still]
                robust[idx] = still
        after[name] = robust.clone()
    return clean_correct, robust, after


def robust_accuracy(unit: Unit, attack_cfg: AttackConfig, generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """Accuracy under one attack on all points (no cascade), and the adversarial inputs."""
    attack = build_attack(attack_cfg)
    x_adv = attack(unit.forward, unit.x, unit.y, noise=attack.init_noise(unit.x, generator))
    return float((predict(unit, x_adv) == unit.y).float().mean()), x_adv


def large_eps(norm: str, dim: int) -> float:
    """A radius at which any image can be moved to a uniform grey: robust accuracy must be ~0."""
    return {"linf": 0.5, "l2": 0.5 * math.sqrt(dim), "l1": 0.5 * dim}[norm]


def masking_checks(units: list[Unit], cfg: ExperimentConfig, generator: torch.Generator,
                   chance: float) -> tuple[list[CheckResult], list[dict[str, float]]]:
    """Carlini et al.'s sanity checks on ``units`` (a few hundred points), and the eps sweep."""
    a = cfg.attack
    tol = 0.02  # two points of accuracy: sampling noise of a few hundred points and restarts

    total = sum(len(u.y) for u in units)

    def mean_acc(attack_cfg: AttackConfig, noises: list[torch.Tensor | None] | None = None) -> float:
        attack = build_attack(attack_cfg)
        correct = 0
        for i, u in enumerate(units):
            noise = noises[i] if noises is not None else attack.init_noise(u.x, generator)
            x_adv = attack(u.forward, u.x, u.y, noise=noise)
            correct += int((predict(u, x_adv) == u.y).sum())
        return correct / total

    # Paired comparisons: the stronger attack starts from the same random points as the base
    # one (its first restart *is* the base run), so only the attack, not the draw, can differ.
    base_noise = [build_attack(a).init_noise(u.x, generator) for u in units]
    checks = []
    base = mean_acc(a, base_noise)
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
    dim = units[0].x[0].numel()
    big = large_eps(a.norm, dim)
    huge = mean_acc(replace(a, eps=big, steps=max(a.steps, 20), step_size=big / 8))
    checks.append(CheckResult("a large eps breaks (almost) every point", huge <= min(0.05, chance),
                              f"{a.norm} eps={big:.3g}: {100 * huge:.1f}% robust (must be <= "
                              f"{100 * min(0.05, chance):.0f}%)"))
    attack_loss = random_loss = 0.0
    for u in units:
        _, x_adv = robust_accuracy(u, a, generator)
        noise = random_perturbation(u.x, a.norm, a.eps, generator)
        with torch.no_grad():
            attack_loss += float(F.cross_entropy(u.forward(x_adv), u.y, reduction="sum"))
            random_loss += float(F.cross_entropy(u.forward(noise), u.y, reduction="sum"))
    checks.append(CheckResult("the attack beats random noise of the same size", attack_loss > random_loss,
                              f"mean CE: attack {attack_loss / max(1, sum(len(u.y) for u in units)):.3f}, "
                              f"random {random_loss / max(1, sum(len(u.y) for u in units)):.3f}"))
    sweep = []
    for multiple in sorted(cfg.eval.eps_sweep):
        eps = multiple * a.eps
        if a.norm == "linf":
            eps = min(eps, 1.0)
        acc = mean_acc(replace(a, eps=eps, step_size=a.step_size * multiple)) if eps > 0 else \
            sum(float((predict(u, u.x) == u.y).float().sum()) for u in units) / sum(len(u.y) for u in units)
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
    """A random point on the sphere of radius ``eps`` (corners for L-inf), clipped to [0, 1]."""
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    flat = g.flatten(1)
    if norm == "linf":
        d = eps * g.sign()
    elif norm == "l2":
        d = eps * (flat / flat.norm(dim=1, keepdim=True)).view_as(x)
    else:
        d = eps * (flat / flat.abs().sum(dim=1, keepdim=True)).view_as(x)
    return (x + d).clamp(0, 1)


def evaluate_units(units: Iterable[Unit], cfg: ExperimentConfig, num_classes: int,
                   class_names: list[str], progress: Callable[[Iterable], Iterable] | None = None
                   ) -> RobustnessReport:
    """Clean and robust accuracy of every unit under the suite of ``cfg``; checks on the first
    ``eval.check_points`` points."""
    generator = None
    configs = suite_configs(cfg, num_classes)
    attacks = [(name, build_attack(c)) for name, c in configs]
    total = clean = robust = 0
    after_counts = {name: 0 for name, _ in attacks}
    per_class_total = torch.zeros(len(class_names))
    per_class_clean = torch.zeros(len(class_names))
    per_class_robust = torch.zeros(len(class_names))
    check_units: list[Unit] = []
    for unit in (progress(units) if progress else units):
        if generator is None:
            generator = torch.Generator(device=unit.x.device)
            generator.manual_seed(cfg.seed)
        clean_correct, robust_mask, after = cascade(unit, attacks, generator)
        total += len(unit.y)
        clean += int(clean_correct.sum())
        robust += int(robust_mask.sum())
        for name, mask in after.items():
            after_counts[name] += int(mask.sum())
        cls = unit.classes.cpu()
        per_class_total += torch.bincount(cls, minlength=len(class_names)).float()
        per_class_clean += torch.bincount(cls, weights=clean_correct.cpu().float(), minlength=len(class_names))
        per_class_robust += torch.bincount(cls, weights=robust_mask.cpu().float(), minlength=len(class_names))
        if cfg.eval.checks and sum(len(u.y) for u in check_units) < cfg.eval.check_points:
            check_units.append(unit)
    checks, sweep = ([], [])
    if cfg.eval.checks and check_units and cfg.attack.eps > 0:
        checks, sweep = masking_checks(check_units, cfg, generator, chance=1 / num_classes)
    seen = per_class_total > 0
    per_class = {class_names[i]: {"points": int(per_class_total[i]),
                                  "clean_acc": float(per_class_clean[i] / per_class_total[i]),
                                  "robust_acc": float(per_class_robust[i] / per_class_total[i])}
                 for i in torch.nonzero(seen).flatten().tolist()}
    return RobustnessReport(total, clean / total, robust / total,
                            {k: v / total for k, v in after_counts.items()}, per_class, sweep, checks)


def classifier_units(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = 256) -> Iterator[Unit]:
    """Units for a plain classifier: batches of ``images`` (uint8 or float in [0, 1])."""
    model.eval()
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size]
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        y = labels[start : start + batch_size]
        yield Unit(model, x, y, y)

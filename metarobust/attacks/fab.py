"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), as a pure function.

A transcription of the reference code (``fab_base.py``, ``fab_pt.py`` and ``fab_projections.py``
of AutoAttack) into the calling convention of :mod:`metarobust.attacks.apgd`: the attack takes a
*forward function*, random restarts draw from :meth:`FAB.init_noise` (a ``torch.Generator``), and
the projections onto the linearised decision boundary replace the reference's index assignments
on row subsets by ``torch.where`` over all rows, so the step loop has no host synchronisation
and runs under ``torch.func.vmap``. Between runs (target classes, restarts) it stops once every
point is broken: one host sync per run, skipped under ``vmap``.

As the reference, every point is attacked in every run and a run's result is kept only for the
points still robust before it (the reference slices those out); for a model that scores each
input on its own the outcome is the same. With one restart FAB-T draws no random numbers, so it
reproduces the reference's points up to float round-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.attacks import threat
from metarobust.attacks.pgd import input_gradient, inside_func_transform
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig
from metarobust.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]


# -- projections onto a hyperplane within the box (the reference's fab_projections.py) ----------
def projection_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest L-inf step ``d`` with ``<w, t + d> = b`` and ``t + d`` in [0, 1], per row of
    ``t, w [R, n]``, ``b [R]`` (rows that cannot reach the hyperplane in the box get the
    box's farthest corner in ``w``'s direction)."""
    sign = torch.where((w * t).sum(1) - b >= 0, 1.0, -1.0).to(t.dtype)
    w = w * sign[:, None]
    b = b * sign
    a = (w < 0).to(t.dtype)
    nonzero = (w != 0).to(t.dtype)
    d = (a - t) * nonzero
    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0[:, None]
    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & ~c_l
    n = w.shape[1]
    lb = torch.zeros_like(b)
    ub = torch.full_like(b, n - 1)
    for _ in range(math.ceil(math.log2(n))):
        mid = torch.floor((lb + ub) / 2)
        m = mid.long()[:, None]
        indcurr = indp.gather(1, n - 1 - m)
        b2 = (sb.gather(1, m) - s.gather(1, m) * p.gather(1, indcurr)).squeeze(1)
        c = b - b2 > 0
        lb = torch.where(c, mid, lb)
        ub = torch.where(c, ub, mid)
    k = lb.long()[:, None]
    lmbd_l = torch.clamp_min((b - sb[:, -1]) / (-s[:, -1]), 0)[:, None]
    lmbd = torch.clamp_min((b - sb.gather(1, k).squeeze(1)) / (-s.gather(1, k).squeeze(1)), 0)[:, None]
    d_2 = torch.minimum(lmbd, d) * a + torch.maximum(-lmbd, d) * (1 - a)
    d = torch.where(c_l[:, None], (2 * a - 1) * lmbd_l, torch.where(c2[:, None], d_2, d))
    return d * nonzero


def projection_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest L2 step ``d`` with ``<w, t + d> = b`` and ``t + d`` in [0, 1], per row."""
    c = (w * t).sum(1) - b
    sign = torch.where(c >= 0, 1.0, -1.0).to(t.dtype)
    w = w * sign[:, None]
    c = c * sign
    small = w.abs() < 1e-8
    r = torch.maximum(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r = r.masked_fill(small, 1e12)
    r = torch.where(r == -1e12, -r, r)
    rs, indr = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs = rs.masked_fill(rs == 1e12, 0)
    rs2 = rs2.masked_fill(rs2 == 1e12, 0)
    w3s = (w ** 2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w) * (~small).to(t.dtype)
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)
    c4 = s[:, 0] + c < 0
    c3 = (d * w).sum(dim=1) + c > 0
    c2 = ~(c4 | c3)
    n = w.shape[1]
    lb = torch.zeros_like(c)
    ub = torch.full_like(c, n - 1)
    for _ in range(math.ceil(math.log2(n))):
        mid = torch.floor((lb + ub) / 2)
        above = s.gather(1, mid.long()[:, None]).squeeze(1) + c > 0
        lb = torch.where(above, mid, lb)
        ub = torch.where(above, ub, mid)
    k = lb.long()[:, None]
    d_4 = -(c / w5.squeeze(-1))[:, None] * w
    ws_k = ws.gather(1, k).squeeze(1)
    alpha = (s.gather(1, k).squeeze(1) + c) / ws_k + rs.gather(1, k).squeeze(1)
    alpha = torch.where(ws_k == 0, torch.zeros_like(alpha), alpha)[:, None]
    c5 = (alpha > r).to(t.dtype)
    d_2 = d * c5 - alpha * w * (1 - c5)
    d = torch.where(c4[:, None], d_4, torch.where(c2[:, None], d_2, d))
    return d * (~small).to(t.dtype)


def projection_l1(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest L1 step ``d`` with ``<w, t + d> = b`` and ``t + d`` in [0, 1], per row."""
    c = (w * t).sum(1) - b
    sign = torch.where(c >= 0, 1.0, -1.0).to(t.dtype)
    w = w * sign[:, None]
    c = c * sign
    r = (1 / w).abs().clamp_max(1e12)
    indr = torch.argsort(r, dim=1)
    indr_rev = torch.argsort(indr)
    d = (-t + (w < 0).to(t.dtype)) * (w != 0).to(t.dtype)
    ds = torch.minimum(-w * t, w * (1 - t)).gather(1, indr)
    s = torch.cumsum(torch.cat((c[:, None], ds), 1), dim=1)
    c2 = s[:, -1] < 0
    n = w.shape[1]
    lb = torch.zeros_like(c)
    ub = torch.full_like(c, s.shape[1])
    for _ in range(math.ceil(math.log2(n))):
        mid = torch.floor((lb + ub) / 2)
        above = s.gather(1, mid.long()[:, None]).squeeze(1) > 0
        lb = torch.where(above, mid, lb)
        ub = torch.where(above, ub, mid)
    k = lb.long()
    # On the rows that need it (c2) the bisection stays below n; elsewhere it is clamped and unused.
    coordinate = indr.gather(1, k.clamp(max=n - 1)[:, None])
    alpha = -s.gather(1, k[:, None]) / w.gather(1, coordinate)
    d_2 = (d * (indr_rev < k[:, None]).to(t.dtype)).scatter(1, coordinate, alpha)
    d = torch.where(c2[:, None], d_2, d)
    return d * (w.abs() > 1e-8).to(t.dtype)


PROJECTIONS = {"linf": projection_linf, "l2": projection_l2, "l1": projection_l1}


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm ``[R]`` as the reference computes it (L2: sum of squares, then sqrt)."""
    flat = d.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return (flat ** 2).sum(1).sqrt()
    return flat.abs().sum(1)


@dataclass(frozen=True)
class FAB:
    r"""FAB-T in 'Minimally distorted adversarial examples with a fast adaptive boundary attack'
    (Croce & Hein, ICML 2020) [https://arxiv.org/abs/1907.02044], as AutoAttack runs it
    [https://github.com/fra31/auto-attack] (``FABAttack_PT`` with ``targeted=True``).

    A minimum-norm attack: each step linearises the margin ``z_t - z_y`` to a target class ``t``,
    projects both the iterate and the clean point onto that hyperplane within the box [0, 1]
    (the exact projections of the reference for L-inf, L2 and L1), takes a convex combination of
    the two steps biased towards the clean point (weight at most ``alpha_max``) with
    overshooting ``eta``, and, once misclassified, records the point if it is the closest so far
    and moves back towards the clean input by ``beta``. A point counts as broken when the closest
    misclassified point found lies within ``eps``. The targets are the ``target_classes`` most
    likely wrong classes of the clean input, tried in turn; restarts after the first start from
    a random point at half of ``eps``.

    Distance Measure : Linf, L2, L1

    Arguments:
        norm (str): ``'linf'``, ``'l2'`` or ``'l1'``.
        eps (float): the radius a point must be broken within (and the random starts' scale).
        steps (int): iterations per target class and restart. (Default: 100)
        restarts (int): runs per target class; the first starts at the clean point, the others
            at random. (Default: 1, AutoAttack's FAB-T)
        target_classes (int): runner-up classes tried, capped at ``N - 1``. (Default: 9)
        alpha_max (float): largest weight of the step from the clean point. (Default: 0.1)
        eta (float): overshooting of the projection. (Default: 1.05)
        beta (float): back step towards the clean point after a success. (Default: 0.9)

    Shape:
        - x: :math:`(B, C, H, W)` in [0, 1] (any :math:`(B, ...)`); y: :math:`(B)` labels.
        - noise: :math:`(B, C, H, W, R)` from :meth:`init_noise` with ``R = restarts *
          target_classes`` when ``restarts > 1``; ``None`` with one restart (nothing is random).
        - output: :math:`(B, C, H, W)`: per point the closest misclassified point found within
          the eps-ball (in [0, 1]), else the clean point.

    Call: ``attack(forward, x, y, noise=None) -> x_adv`` (two forward passes and one backward
    pass per step).

    Examples::
        >>> attack = FAB("linf", eps=8/255)                       # AutoAttack's FAB-T
        >>> x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
    """

    norm: str
    eps: float
    steps: int = 100
    restarts: int = 1
    target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9

    def __post_init__(self) -> None:
        if self.norm not in threat.NORMS:
            raise ConfigError(f"attack.norm={self.norm!r}; FAB supports {', '.join(threat.NORMS)}")
        if self.eps < 0:
            raise ConfigError(f"attack.eps={self.eps} must be >= 0")
        if self.steps < 1 or self.restarts < 1 or self.target_classes < 1:
            raise ConfigError(f"attack.steps={self.steps}, attack.restarts={self.restarts} and "
                              f"attack.target_classes={self.target_classes} must be >= 1")
        if not 0 <= self.alpha_max <= 1 or self.eta < 1 or not 0 < self.beta <= 1:
            raise ConfigError(f"alpha_max={self.alpha_max}, eta={self.eta}, beta={self.beta}: expected "
                              f"alpha_max in [0, 1], eta >= 1 and beta in (0, 1]")

    @property
    def runs(self) -> int:
        return self.restarts * self.target_classes

    def init_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Raw draws for the random restarts, ``[*x.shape, runs]`` (run ``k * restarts + r``;
        the first restart of each target never uses its draw), or ``None`` with one restart.
        L-inf: uniform in [-1, 1]; L2 and L1: standard normal, as the reference."""
        if self.restarts == 1:
            return None
        return threat.reference_draws(x, self.norm, self.runs, generator)

    def _start(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The reference's random start: ``x + eps * t / ||t|| / 2``, clipped to [0, 1]."""
        size = threat.expand_per_sample(_norm(t, self.norm), x)
        return (x + self.eps * t / size * 0.5).clamp(0, 1)

    def _run(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
             start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``attack_single_run`` of the reference: the closest misclassified point ``[B, ...]``
        and its distance ``[B]`` (``1e10`` where none was found)."""
        project = PROJECTIONS[self.norm]
        batch = x.shape[0]

        def margin(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = forward(z).float()
            diff = logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])  # z_t - z_y
            return diff.sum(), diff.squeeze(1).detach()

        gradient = input_gradient(margin)
        x0 = x.flatten(1)
        x1 = start
        best = x
        distance = torch.full((batch,), 1e10, device=x.device, dtype=x.dtype)
        for _ in range(self.steps):
            dg, df = gradient(x1)
            w = dg.flatten(1)
            b = -df + (w * x1.flatten(1)).sum(1)
            d3 = project(torch.cat((x1.flatten(1), x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1, d2 = d3[:batch].view_as(x), d3[batch:].view_as(x)
            a0 = _norm(d3, self.norm).clamp_min(1e-8)
            a1, a2 = a0[:batch], a0[batch:]
            alpha = threat.expand_per_sample((a1 / (a1 + a2)).clamp(0, self.alpha_max), x)
            x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x + d2 * self.eta) * alpha).clamp(0, 1)
            with torch.no_grad():
                fooled = forward(x1).argmax(-1) != y
            size = _norm(x1 - x, self.norm)
            closer = fooled & (size < distance)
            best = torch.where(threat.expand_per_sample(closer, x), x1, best)
            distance = torch.where(closer, size, distance)
            x1 = torch.where(threat.expand_per_sample(fooled, x), x + (x1 - x) * self.beta, x1).detach()
        return best, distance

    def __call__(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, loss: None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        if loss is not None:
            raise ValueError("FAB minimises the distance to the decision boundary; it takes no loss")
        x = x.detach()
        if self.restarts > 1 and (noise is None or tuple(noise.shape) != (*x.shape, self.runs)):
            got = None if noise is None else tuple(noise.shape)
            raise ValueError(f"noise has shape {got}, expected {(*x.shape, self.runs)} = (*x.shape, runs) "
                             f"from attack.init_noise(x, generator)")
        with torch.no_grad():
            clean_logits = forward(x).float()
        num_classes = clean_logits.shape[-1]
        if num_classes < 2:
            raise ValueError(f"FAB-T needs a wrong class to target; the model has {num_classes} class")
        robust = clean_logits.argmax(-1) == y
        out = x
        ranked = clean_logits.sort(dim=-1)[1]  # ascending, as the reference: -2 is the runner-up
        for k in range(min(self.target_classes, num_classes - 1)):
            target = ranked[:, -(k + 2)]
            for r in range(self.restarts):
                if _all_broken(robust):
                    return out
                start = x if r == 0 else self._start(x, noise[..., k * self.restarts + r])
                best, distance = self._run(forward, x, y, target, start)
                fooled = robust & (distance <= self.eps)
                out = torch.where(threat.expand_per_sample(fooled, x), best, out)
                robust = robust & ~fooled
        return out


def _all_broken(robust: torch.Tensor) -> bool:
    """No robust point left: a host sync between runs, never under ``vmap``."""
    return not inside_func_transform() and not bool(robust.any())


@ATTACKS.register("fab_t", "FAB-T (Croce & Hein 2020): targeted minimum-norm boundary attack in linf/l2/l1; "
                           "attack.steps per target (AutoAttack: 100), target_classes (9), restarts (1)")
def _fab_t(cfg: AttackConfig) -> FAB:
    return FAB(cfg.norm, cfg.eps, cfg.steps, cfg.restarts, cfg.target_classes)


__all__ = ["FAB", "projection_l1", "projection_l2", "projection_linf"]

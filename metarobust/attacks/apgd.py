"""Auto-PGD (Croce & Hein, ICML 2020; L1: Croce & Hein, ICCV 2021), as a pure function.

A transcription of the reference code (``autopgd_base.py`` of AutoAttack: ``APGDAttack`` and
``APGDAttack_targeted``) into the calling convention of :mod:`metarobust.attacks.pgd`: the
attack takes a *forward function*, the random starting points are drawn beforehand by
:meth:`APGD.init_noise` from a ``torch.Generator``, and the step loop is built from per-sample
tensor operations only (``torch.where`` instead of index assignment, a checkpoint schedule fixed
on the host from ``steps``), so it has no host synchronisation and runs under ``torch.func.vmap``
over tasks. Between runs (restarts, target classes) it stops early once every point is broken:
one host sync per run, skipped under ``vmap``.

The reference attacks only the points still robust in each restart by slicing them out; this
attacks every point and keeps a run's result only for the points robust before it. The outcome
is the same for a model that scores each input on its own, and a model that looks at the whole
batch (transductive batch norm) keeps seeing the whole batch. Given the same random draws (a
``torch.Generator`` seeded like the reference's global seed draws the same numbers when all
points are attacked), the untargeted attack reproduces the reference's adversarial points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from metarobust.attacks import threat
from metarobust.attacks.losses import LOSSES, TARGETED_LOSSES
from metarobust.attacks.pgd import input_gradient, inside_func_transform
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig
from metarobust.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]
PerSampleLoss = Callable[..., torch.Tensor]
"""``(logits [B, N], y) -> [B]``; targeted: ``(logits, y, target [B]) -> [B]``; maximised."""
Fooled = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits, y) -> bool [B]``: whether the model's output breaks each point."""



def checkpoints(steps: int) -> dict[int, int]:
    """The iterations after which L-inf/L2 APGD may halve its step size, with each window's length.

    The paper's ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` in the
    reference's integer form: the first window is ``max(int(0.22 n), 1)`` iterations, each next
    one ``max(int(0.03 n), 1)`` shorter, down to ``max(int(0.06 n), 1)``. Returns
    ``{iteration index: window length}``, computed on the host so the loop never syncs.
    """
    window = max(int(0.22 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    shrink = max(int(0.03 * steps), 1)
    out: dict[int, int] = {}
    i = -1
    while i + window < steps:
        i += window
        out[i] = window
        window = max(window - shrink, shortest)
    return out


def l1_eps_schedule(eps: float, steps: int) -> list[tuple[float, int]]:
    """AutoAttack's L1 schedule (``use_largereps``): ``(radius, iterations)`` stages at 3, 2 and
    1 times ``eps`` for 30 %, 30 % and the rest of ``steps``."""
    first = math.ceil(0.3 * steps)
    # For steps < 4 the last stage gets no step (the reference's too) but still reports the
    # starting point projected onto the eps-ball, so the output never leaves it.
    return [(3.0 * eps, first), (2.0 * eps, first), (1.0 * eps, max(steps - 2 * first, 0))]


def _l2(d: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm ``[B]`` (as the reference writes it: sum of squares, then sqrt)."""
    return d.pow(2).flatten(1).sum(1).sqrt()


def _l1(d: torch.Tensor) -> torch.Tensor:
    return d.abs().flatten(1).sum(1)


def _l0(d: torch.Tensor) -> torch.Tensor:
    return (d != 0).flatten(1).sum(1).to(d.dtype)


def l1_projection(x: torch.Tensor, d: torch.Tensor, eps: float) -> torch.Tensor:
    """The correction ``c`` that puts ``x + d + c`` on the intersection of the L1 ball of radius
    ``eps`` around ``x`` and the box [0, 1] (Croce & Hein 2021, the reference ``L1_projection``).

    Same algorithm as the reference, a sort plus a bisection over the breakpoints, with its
    index assignments on the rows that violate the ball written as ``torch.where`` over all
    rows, and a bisection length fixed by the shape, so it runs under ``vmap`` without a sync.
    """
    shape = x.shape
    x, y = x.flatten(1), d.flatten(1)
    sigma = y.sign()
    u = torch.minimum(torch.minimum(1 - x - y, x + y), torch.zeros_like(y))  # box correction
    lower = -y.abs()
    bs, order = torch.sort(-torch.cat((u, lower), 1), dim=1)
    bs2 = torch.cat((bs[:, 1:], torch.zeros_like(bs[:, :1])), 1)
    sizes = (2 * (order < u.shape[1]).to(y.dtype) - 1).cumsum(dim=1)
    s1 = -u.sum(dim=1)
    c = eps - y.abs().sum(dim=1)
    outside = s1 + c < 0  # rows still outside the ball after the box correction alone
    s = s1.unsqueeze(-1) + torch.cumsum((bs2 - bs) * sizes, dim=1)

    lb = torch.zeros_like(c)
    ub = torch.full_like(c, bs.shape[1] - 1)
    for _ in range(math.ceil(math.log2(bs.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        below = s.gather(1, mid.long()[:, None]).squeeze(1) + c < 0
        lb = torch.where(below, mid, lb)
        ub = torch.where(below, ub, mid)
    k = lb.long()[:, None]
    # The threshold is only meaningful on the rows outside the ball; elsewhere it is discarded.
    alpha = (-s.gather(1, k) - c[:, None]) / sizes.gather(1, k + 1) + bs2.gather(1, k)
    shrunk = -torch.minimum(torch.maximum(-u, alpha), -lower)
    return (sigma * torch.where(outside[:, None], shrunk, u)).view(shape)


@dataclass(frozen=True)
class APGD:
    r"""APGD in 'Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks' (Croce & Hein, ICML 2020) [https://arxiv.org/abs/2003.01690]
    [https://github.com/fra31/auto-attack]; ``targeted=True`` is AutoAttack's APGD-T; ``norm='l1'``
    is APGD-L1 of 'Mind the box: l1-APGD for sparse adversarial attacks on image classifiers'
    (Croce & Hein, ICCV 2021) [https://arxiv.org/abs/2103.01208].

    L-inf/L2: PGD with momentum 0.75 whose step size starts at ``2 eps`` and is halved, per
    sample, at checkpoints when at most a fraction ``rho`` of the steps since the last one raised
    the loss, or when the step was kept last time and the best loss has not improved since; on
    halving, the iterate restarts from the best point found. L1: steps along the sign of the
    largest gradient coordinates (a sparsity adapted to the best point's), step size starting at
    ``eps``, projection onto the L1 ball intersected with [0, 1]. Targeted: each of the
    ``target_classes`` most likely wrong classes of the clean input is tried in turn.

    Distance Measure : Linf, L2, L1

    Arguments:
        norm (str): threat model, ``'linf'``, ``'l2'`` or ``'l1'`` (case-insensitive).
        eps (float): radius of the ball in [0, 1] pixel units (L-inf 8/255, L2 0.5, L1 12).
        steps (int): iterations per restart and target class. (Default: 100)
        restarts (int): random restarts (per target class when targeted). (Default: 1)
        loss (str or None): ``'ce'``, ``'dlr'`` or ``'cw'``; ``None`` picks AutoAttack's:
            ``'ce'`` untargeted, ``'dlr'`` (targeted DLR) targeted. (Default: None)
        targeted (bool): run APGD-T. (Default: False)
        target_classes (int): runner-up classes tried when targeted, capped at ``N - 1`` for
            ``N`` classes. (Default: 9)
        rho (float): L-inf/L2: the step is halved when at most this fraction of the steps
            since the last checkpoint raised the loss. (Default: 0.75)
        l1_large_eps (bool): L1 only: spend 30 %, 30 % and 40 % of the steps at radius
            3 eps, 2 eps and eps (AutoAttack's L1 evaluation, ``use_largereps``).
            (Default: True)

    Shape:
        - x: :math:`(B, C, H, W)` in [0, 1] (any :math:`(B, ...)`).
        - y: :math:`(B)` labels; or :math:`(B, N)` soft targets for a custom ``loss``, a point
          then counting as broken when its prediction leaves ``y.argmax(-1)``.
        - noise: :math:`(B, C, H, W, R)` from :meth:`init_noise`, ``R`` the number of runs
          (``restarts``, times ``target_classes`` when targeted). The runs come *last* so a
          task dimension in front (``x [T, B, C, H, W]``) stays in front, and ``vmap`` maps
          the noise over dim 0 like every other input.
        - output: :math:`(B, C, H, W)` inside the ball and in [0, 1]: per point, the first
          misclassified point found over restarts and targets, else the point of highest
          loss; a point misclassified when clean is returned unchanged.

    Call: ``attack(forward, x, y, loss=None, noise=noise) -> x_adv``; ``loss`` overrides the
    configured one with a name or a per-sample callable (see :data:`PerSampleLoss`). Instead of
    ``noise``, ``generator=`` or ``seed=`` has the call draw it (the same seed, the same
    ``x_adv``). The call first checks ``x`` (float, finite, in [0, 1]: normalisation belongs
    inside the model) and warns about a module in train mode, with one host synchronisation,
    outside ``torch.func`` transforms; ``check=False`` skips that.

    Examples::
        >>> x_adv = APGD("Linf", eps=8/255)(model.eval(), x, y, seed=0)   # APGD-CE, 100 steps
        >>> attack = APGD("linf", eps=8/255, steps=100, restarts=1, loss="ce")
        >>> noise = attack.init_noise(x, torch.Generator().manual_seed(0))
        >>> x_adv = attack(model, x, y, noise=noise)
        >>> apgd_t = APGD("linf", eps=8/255, targeted=True)  # targeted DLR, 9 target classes
    """

    norm: str
    eps: float
    steps: int = 100
    restarts: int = 1
    loss: str | None = None
    targeted: bool = False
    target_classes: int = 9
    rho: float = 0.75
    l1_large_eps: bool = True

    verdicts: ClassVar[bool] = True  # __call__(..., verdict=True) -> (x_adv, fooled)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", threat.norm_name(self.norm, "attack.norm"))
        if self.eps < 0:
            raise ConfigError(f"attack.eps={self.eps} must be >= 0")
        if self.steps < 1 or self.restarts < 1 or self.target_classes < 1:
            raise ConfigError(f"attack.steps={self.steps}, attack.restarts={self.restarts} and "
                              f"attack.target_classes={self.target_classes} must be >= 1")
        if not 0 < self.rho <= 1:
            raise ConfigError(f"rho={self.rho} must be in (0, 1]")
        if self.loss is None:  # AutoAttack's choice: APGD-CE, and APGD-T on the targeted DLR
            object.__setattr__(self, "loss", "dlr" if self.targeted else "ce")
        table = TARGETED_LOSSES if self.targeted else LOSSES
        if self.loss not in table:
            raise ConfigError(f"attack.loss={self.loss!r}; choose one of {sorted(table)}")

    @property
    def runs(self) -> int:
        """Attack runs per point: restarts, times the target classes when targeted."""
        return self.restarts * (self.target_classes if self.targeted else 1)

    def init_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw draws for the random starts, ``[*x.shape, runs]``, as the reference draws them:
        ``2 u - 1`` with ``u`` uniform (L-inf), standard normal (L2, L1). The call maps each
        sample's draw into the ball (L-inf/L2: scaled to norm ``eps``, the reference's
        ``normalize``; L1: projected), which needs to know what one sample is, so it waits."""
        return threat.reference_draws(x, self.norm, self.runs, generator)

    # -- geometry ------------------------------------------------------------------------------
    def _start(self, x: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
        """The reference's random start from the draw ``t``, clipped to [0, 1]."""
        if self.norm == "l1":
            return (x + t + l1_projection(x, t, eps)).clamp(0, 1)
        size = t.abs().flatten(1).amax(1) if self.norm == "linf" else _l2(t)
        return (x + eps * (t / (threat.expand_per_sample(size, x) + 1e-12))).clamp(0, 1)

    def _project(self, x: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
        """``z`` onto the eps-ball around ``x``, then onto [0, 1] (the reference's order for
        L-inf/L2: clipping to the box only shrinks the perturbation, so it stays in the ball).
        L1 projects onto the intersection, then clips off rounding errors."""
        if self.norm == "linf":
            return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0, 1)
        d = z - x
        if self.norm == "l1":
            return (x + d + l1_projection(x, d, eps)).clamp(0, 1)  # the reference's rounding
        size = threat.expand_per_sample(_l2(d), d)
        return (x + d / (size + 1e-12) * size.clamp(max=eps)).clamp(0, 1)

    # -- one run -------------------------------------------------------------------------------
    def _run(self, forward: Forward, x: torch.Tensor, broken: Callable[[torch.Tensor], torch.Tensor],
             objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, eps: float,
             steps: int, fresh: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``attack_single_run`` of the reference from ``start`` (``fresh``: a random start,
        not the output of a previous L1 stage, which sets the initial sparsity).

        Returns ``x_best`` (highest loss), ``robust [B]`` (no iterate ``broken``), the best
        loss ``[B]`` and ``x_best_adv`` (the last broken iterate; used where not robust).
        """

        def total(z: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            logits = forward(z)
            loss = objective(logits)
            if loss.dim() != 1:
                raise ValueError(f"APGD needs a per-sample loss [B] (e.g. losses.ce_per_sample), got "
                                 f"shape {tuple(loss.shape)}: it adapts its step size per sample")
            return loss.sum(), (loss, logits)

        # Plain autograd outside torch.func transforms (faster, and it runs a compiled forward's
        # compiled backward), torch.func.grad under vmap: input_gradient chooses, once per call.
        gradient = input_gradient(total)

        def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            grad, (loss, logits) = gradient(z)
            # Detached: a forward over live parameters must not chain a graph across iterations.
            return grad.detach(), loss.detach(), logits.detach()

        def per(v: torch.Tensor) -> torch.Tensor:
            return threat.expand_per_sample(v, x)

        l1 = self.norm == "l1"
        x_adv = start
        grad, loss, logits = evaluate(x_adv)
        robust = ~broken(logits)
        x_best_adv = x_adv
        x_best, grad_best, loss_best = x_adv, grad, loss
        step = torch.full_like(loss, (1.0 if l1 else 2.0) * eps)

        if l1:
            # Checkpoints every 4 % of the steps; the sparsity (fraction of coordinates moved per
            # step) starts at 20 %, or, continuing a previous stage, at 2/3 of its point's.
            features = x[0].numel()
            period = max(int(0.04 * steps), 1)
            schedule = {i: period for i in range(period - 1, steps, period)}
            if fresh:
                sparsity = torch.full_like(loss, 0.2)
                support_old = torch.full_like(loss, float(features))
            else:
                support_old = _l0(x_adv - x)
                sparsity = support_old / features / 1.5
        else:
            schedule = checkpoints(steps)
            x_old = x_adv
            # The reference counts a rise against the previous entry of a zero-filled history,
            # so the first step of the first window compares with 0, not with the start's loss.
            loss_prev = torch.zeros_like(loss)
            rises = torch.zeros_like(loss)
            loss_best_last_check = loss_best
            reduced_last_check = torch.ones_like(robust)

        for i in range(steps):
            if l1:
                # Move the top coordinates of |grad| (the rest stay): sparse steps suit the L1
                # ball, whose vertices are sparse. No momentum, as in the reference.
                ranked = grad.abs().flatten(1).sort(dim=-1).values
                kth = ((1 - sparsity) * features).clamp(0, features - 1).long()
                threshold = ranked.gather(1, kth[:, None]).squeeze(1)
                direction = (grad * (grad.abs() >= per(threshold))).sign()
                z = x_adv + per(step) * direction / (per(_l1(direction)) + 1e-10)
                x_adv = self._project(x, z, eps)
            else:
                momentum = x_adv - x_old
                x_old = x_adv
                a = 0.75 if i > 0 else 1.0
                if self.norm == "linf":
                    direction = grad.sign()
                else:
                    direction = grad / (per(_l2(grad)) + 1e-12)
                z = self._project(x, x_adv + per(step) * direction, eps)
                x_adv = self._project(x, x_adv + (z - x_adv) * a + momentum * (1 - a), eps)

            grad, loss, logits = evaluate(x_adv)
            correct = ~broken(logits)
            robust = robust & correct
            x_best_adv = torch.where(per(correct), x_best_adv, x_adv)

            if not l1:
                rises = rises + (loss > loss_prev).to(loss.dtype)
                loss_prev = loss
            improved = loss > loss_best
            x_best = torch.where(per(improved), x_adv, x_best)
            grad_best = torch.where(per(improved), grad, grad_best)
            loss_best = torch.where(improved, loss, loss_best)

            window = schedule.get(i)
            if window is None:
                continue
            if l1:
                # Sparsity follows the best point's support; the step resets to its largest
                # value where the support shrank by 5 % (and the iterate restarts from the best
                # point), else it shrinks by 1.5, never below a tenth of eps.
                support = _l0(x_best - x)
                restart = support / support_old < 0.95
                sparsity = support / features / 1.5
                step = torch.where(restart, torch.full_like(step, eps), step / 1.5)
                step = step.clamp(eps / 10, eps)
                support_old = support
            else:
                # Condition 1: too few steps raised the loss (oscillation). Condition 2: the step
                # was kept at the last checkpoint and the best loss has not improved since.
                oscillating = rises <= window * self.rho
                stalled = ~reduced_last_check & (loss_best_last_check >= loss_best)
                restart = oscillating | stalled
                reduced_last_check = restart
                loss_best_last_check = loss_best
                step = torch.where(restart, step / 2, step)
                rises = torch.zeros_like(rises)
            x_adv = torch.where(per(restart), x_best, x_adv)
            grad = torch.where(per(restart), grad_best, grad)
        return x_best, robust, loss_best, x_best_adv

    def _attack_once(self, forward: Forward, x: torch.Tensor, broken: Callable[[torch.Tensor], torch.Tensor],
                     objective: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart from the draw ``t``; L1 with ``l1_large_eps`` chains the stages of
        :func:`l1_eps_schedule`, each starting from the previous stage's best point, and reports
        the last (radius ``eps``) stage, as the reference's ``decr_eps_pgd``."""
        if self.norm != "l1" or not self.l1_large_eps:
            return self._run(forward, x, broken, objective, self._start(x, t, self.eps), self.eps, self.steps)
        stages = l1_eps_schedule(self.eps, self.steps)
        z = x + t
        z = z + l1_projection(x, z - x, stages[0][0])
        for eps, steps in stages:
            z = z + l1_projection(x, z - x, eps)
            result = self._run(forward, x, broken, objective, z.clamp(0, 1), eps, steps, fresh=False)
            z = result[0]
        return result

    # -- the attack ----------------------------------------------------------------------------
    def __call__(self, forward: Forward, x: torch.Tensor, y: torch.Tensor,
                 loss: str | PerSampleLoss | None = None, noise: torch.Tensor | None = None,
                 verdict: bool = False, *, generator: torch.Generator | None = None, seed: int | None = None,
                 check: bool = True, fooled: Fooled | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The adversarial examples, or with ``verdict`` ``(x_adv, fooled [B])``: ``fooled`` marks
        the points misclassified clean or at some iterate of some run, every iterate a whole batch
        the model scored. The returned examples are a per-sample choice among iterates, a batch
        no run produced: for a batch-coupled model (transductive batch norm) another point's
        change can un-fool a point in it, and ``fooled`` still counts that point.
        ``generator``/``seed`` and ``check``: see the class docstring.

        ``fooled=`` replaces the test of a broken point (its prediction leaves the label) with
        ``fooled(logits, y) -> bool [B]``, untargeted only: with a per-sample ``loss`` it attacks
        any output, e.g. label maps (``y [B, H, W]``, logits ``[B, 2, H, W]``); a test that is
        never true makes the attack return every point's highest-loss iterate."""
        x = x.detach()
        batch_norms = threat.train_mode_layers(forward, (torch.nn.modules.batchnorm._BatchNorm,))
        if batch_norms:  # torch.func.grad refuses the in-place update of the running statistics
            raise ConfigError(f"APGD cannot attack a model whose BatchNorm layers ({', '.join(batch_norms)}) are "
                              f"in train mode: it differentiates with torch.func, which cannot update their "
                              f"running statistics; call model.eval() first")
        if check and not inside_func_transform():  # once per call, never in the step loop
            threat.check_call(x)
            threat.warn_if_training(forward)
        noise = threat.start_noise(noise, generator, seed, lambda g: self.init_noise(x, g), x.device)
        if tuple(noise.shape) != (*x.shape, self.runs):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(*x.shape, self.runs)} "
                             f"= (*x.shape, runs) from attack.init_noise(x, generator)")
        loss = self.loss if loss is None else loss
        if isinstance(loss, str):
            table = TARGETED_LOSSES if self.targeted else LOSSES
            if loss not in table:
                raise ValueError(f"loss={loss!r}; choose one of {sorted(table)} or pass a callable")
            loss_fn: PerSampleLoss = table[loss]
        else:
            loss_fn = loss
        name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        if fooled is None:
            labels = y.argmax(-1) if y.is_floating_point() else y

            def broken(logits: torch.Tensor) -> torch.Tensor:
                return logits.argmax(-1) != labels
        elif self.targeted:
            raise ConfigError("fooled= needs an untargeted APGD: the target classes are read off class logits")
        else:
            def broken(logits: torch.Tensor) -> torch.Tensor:
                return fooled(logits, y)

        clean_logits = forward(x).detach()
        num_classes = clean_logits.shape[-1]
        # DLR divides by a gap of the sorted logits: pi_1 - pi_3, targeted pi_1 - (pi_3 + pi_4) / 2.
        needed = 4 if loss_fn is TARGETED_LOSSES["dlr"] else 3 if loss_fn is LOSSES["dlr"] else 2
        if fooled is None and num_classes < needed:  # with fooled=, the last dim need not be classes
            raise ValueError(f"the {'targeted ' if self.targeted else ''}{name} loss needs at least "
                             f"{needed} classes, the model has {num_classes}")
        robust = ~broken(clean_logits)
        out = x
        highest = torch.full(robust.shape, float("-inf"), device=x.device, dtype=clean_logits.dtype)
        x_highest = x

        if self.targeted:
            targets = min(self.target_classes, num_classes - 1)
            # Ascending sort as the reference: column -2 is the runner-up, -3 the next...
            ranked = clean_logits.sort(dim=-1)[1]
        else:
            targets = 1
        for k in range(targets):
            if self.targeted:
                target = ranked[:, -(k + 2)]

                def objective(logits: torch.Tensor, target: torch.Tensor = target) -> torch.Tensor:
                    return loss_fn(logits, y, target)
            else:
                def objective(logits: torch.Tensor) -> torch.Tensor:
                    return loss_fn(logits, y)

            for r in range(self.restarts):
                if _all_broken(robust):
                    return self._result(robust, x, x_highest, out, verdict)
                x_best, still, loss_best, x_fooling = self._attack_once(
                    forward, x, broken, objective, noise[..., k * self.restarts + r])
                # Keep a run's result only where the point was robust before it (the reference
                # attacks only those): the first misclassified point found wins.
                fooled = robust & ~still
                out = torch.where(threat.expand_per_sample(fooled, x), x_fooling, out)
                robust = robust & still
                higher = loss_best > highest
                x_highest = torch.where(threat.expand_per_sample(higher, x), x_best, x_highest)
                highest = torch.where(higher, loss_best, highest)
        return self._result(robust, x, x_highest, out, verdict)

    @staticmethod
    def _result(robust: torch.Tensor, x: torch.Tensor, x_highest: torch.Tensor, fooling: torch.Tensor,
                verdict: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The point of highest loss where still robust, else the first fooling one."""
        x_adv = torch.where(threat.expand_per_sample(robust, x), x_highest, fooling)
        return (x_adv, ~robust) if verdict else x_adv


def _all_broken(robust: torch.Tensor) -> bool:
    """No robust point left: a host sync, taken only between runs and never under ``vmap``,
    where a Python branch on data is impossible (there the remaining runs just change nothing)."""
    if inside_func_transform():
        return False
    return not bool(robust.any())


@ATTACKS.register("apgd", "APGD (Croce & Hein 2020): step-size-free PGD with momentum; attack.loss ce|dlr|cw")
def _apgd(cfg: AttackConfig) -> APGD:
    return APGD(cfg.norm, cfg.eps, cfg.steps, cfg.restarts, cfg.loss, cfg.targeted, cfg.target_classes)


@ATTACKS.register("apgd_t", "targeted APGD-DLR over the top target_classes runner-up classes (AutoAttack)")
def _apgd_t(cfg: AttackConfig) -> APGD:
    # AutoAttack's APGD-T is the targeted DLR; the config's default loss (ce) reads as "not
    # chosen". A targeted CE or CW attack is `apgd` with attack.targeted=true.
    if cfg.loss not in ("ce", "dlr"):
        raise ConfigError(f"attack.loss={cfg.loss!r}: apgd_t is AutoAttack's targeted DLR attack; for a "
                          f"targeted {cfg.loss} attack use attack.name=apgd with attack.targeted=true")
    return APGD(cfg.norm, cfg.eps, cfg.steps, cfg.restarts, "dlr", True, cfg.target_classes)

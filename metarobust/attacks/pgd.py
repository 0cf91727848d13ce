"""Projected gradient descent (Madry et al., ICLR 2018) and FGSM in L-inf, L2 and L1, as pure functions.

An attack takes a *forward function*, not a module, so the same code attacks a plain model,
the fast weights of an adapted learner (``lambda x: functional_call(model, fast, x)``), and a
task inside ``torch.func.vmap``. Randomness (the random start) is drawn by the caller with
:meth:`PGD.init_noise` outside any ``vmap``, from a ``torch.Generator``, and passed in as
``noise``; that keeps vmapped and looped executions bit-identical and runs reproducible.

Inputs live in [0, 1]; the model normalises internally. The gradient is taken with
``torch.func.grad`` inside a ``torch.func`` transform (``vmap``) and with plain
``torch.autograd.grad`` otherwise (same gradients, faster; see :func:`input_gradient`), so the
step loop has no host synchronisation, works under ``vmap`` and inside ``torch.no_grad()``;
per-sample decisions (early stopping, the best restart) are masks.
The threat models (projections, step directions, random starts) are in
:mod:`metarobust.attacks.threat`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from metarobust import compilation
from metarobust.attacks import threat
from metarobust.attacks.losses import LOSSES, TARGETED_LOSSES
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig
from metarobust.precision import full_precision

Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def inside_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``...) is active. torch has no public
    query for it; the private one is guarded, and without it the answer is ``True``: the path
    that is correct everywhere (``torch.func.grad``, no data-dependent branch), only slower."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return True if peek is None else peek() is not None


def input_gradient(objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
    """``d -> (d objective / d d, aux)`` for ``objective(d) -> (scalar, aux)``.

    Inside a ``torch.func`` transform (``vmap``, ``grad``...) this is ``torch.func.grad``; with
    none active it is plain ``torch.autograd.grad`` (under ``enable_grad``, so it also runs inside
    ``torch.no_grad()``). Both give bit-identical gradients (same engine, same accumulation
    order), but ``func.grad`` accumulates out of place through its tensor wrappers and measured
    ~10 % slower on Conv-4 (BENCHMARKS.md, the former ``scripts/bench_attacks.py``'s ``floor_func``). The check is made
    once per attack call, not per step.
    """
    if inside_func_transform():
        return torch.func.grad(objective, has_aux=True)

    def gradient(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            d = d.detach().requires_grad_(True)
            value, aux = objective(d)
            (g,) = torch.autograd.grad(value, d)
        return g, aux

    return gradient


def _is_labels(y: torch.Tensor) -> bool:
    return y.dim() == 1 and not torch.is_floating_point(y) and not torch.is_complex(y)


@dataclass(frozen=True)
class PGD:
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083], in L-inf, L2 and L1, with restarts and targeted mode.

    Distance Measure : Linf, L2 or L1 (``norm``)

    Each step moves ``delta`` by ``step_size`` along the steepest-ascent direction of the norm
    (L-inf: ``sign(g)``; L2: ``g / ||g||_2``; L1: SLIDE's sparse step, Tramer & Boneh 2019) and
    projects onto the eps-ball, then onto the box [0, 1] (:mod:`metarobust.attacks.threat`).

    Arguments:
        norm (str): threat model, ``"linf"``, ``"l2"`` or ``"l1"`` (case-insensitive: ``"Linf"``,
            ``"L2"``).
        eps (float or Tensor [B]): radius of the ball in [0, 1] pixel units, or one per sample
            (L-inf 8/255; L2 0.5; L1 12 on CIFAR-sized inputs).
        step_size (float or Tensor [B] or None): the norm of each step; ``None``: Madry et al.'s
            ``2.5 eps / steps`` in every norm (the constructor's ``eps``), so the steps could
            cross the ball 2.5 times over (L-inf 8/255, 10 steps: 2/255; L2 0.5: 0.125; L1 12:
            3, spread over the top 1 % coordinates). (Default: None)
        steps (int): number of steps (>= 1). (Default: 10)
        random_start (bool): start from a random point of the ball. (Default: True)
        restarts (int): independent random starts; per sample the best is kept: one that
            succeeds (misclassified, or target reached) if any does, else the highest loss
            (judged per restart, so exact for models that treat samples independently).
            (Default: 1)
        loss (str): the per-sample objective from ``LOSSES`` (``"ce"``, ``"dlr"``, ``"cw"``),
            used when the call gets no ``loss``. (Default: ``"ce"``)
        targeted (bool): ``y`` are target classes and ``TARGETED_LOSSES[loss]`` is maximised
            (CE: minus the cross-entropy to the target). (Default: False)
        early_stop (bool): with the attack's own objective (no ``loss`` passed) and labels
            ``y``, a sample stops moving once it succeeds, so its first successful point is
            kept and more steps can never un-fool it. Sound only when each sample's logits
            depend on that sample alone: with a batch-coupled model (MAML's transductive batch
            norm, ``TaskBatchNorm2d``) a stopped sample is un-fooled again as the others move
            (Conv-4 few-shot eval at eps 0.5: 9 % robust with it, < 5 % without), hence off by
            default; turn it on for independent classifiers. A passed ``loss`` (training:
            maximise the loss) never stops early. (Default: False)
        l1_quantile (float): SLIDE's quantile ``q``: L1 steps move the top ``1 - q`` fraction of
            coordinates by ``|g|``. (Default: 0.99)
        compile (bool or None): run the step loop compiled: the forward (an ``nn.Module``;
            compiled once and cached) and, in L-inf and L2, the step update :func:`pgd_update`
            (one ``fullgraph`` graph taking ``eps`` and the step as tensors: a new budget does not
            recompile). ``False``: eager, the reference. ``None``: compiled when ``forward`` is
            already a ``torch.compile`` module (``at.compile=on`` in training). Inside ``vmap`` the
            loop is always eager. (Default: None)

    Shape (call): ``attack(forward, x, y, loss=None, noise=None, *, eps=None, labels=None,
    step_size=None, generator=None, seed=None, check=True) -> x_adv``

        - forward: ``x -> logits [B, N]`` (a module, or a function of fast weights). A module in
          train mode with BatchNorm or dropout gets a :class:`~metarobust.attacks.threat.TrainModeWarning`
          (its running statistics would be overwritten): call ``model.eval()`` first.
        - x: ``[B, C, H, W]`` (any ``[B, ...]``) in [0, 1]; normalisation belongs inside the model.
        - y: labels ``int64 [B]`` (untargeted), target classes ``[B]`` (targeted), or whatever
          ``loss`` takes as its target (e.g. clean log-probabilities ``[B, N]`` for TRADES).
        - loss: ``(logits, y) -> scalar``, summed over the batch (``cross_entropy_sum``,
          ``kl_from_clean``); ``None``: the configured per-sample loss, summed.
        - noise: from :meth:`init_noise`; or ``generator=`` / ``seed=`` to have the call draw it
          (the same seed gives the same ``x_adv``). One of the three is required when
          ``random_start``.
        - eps: overrides the radius for this call (float or ``[B]``).
        - step_size: overrides the step for this call (float, 0-dim or ``[B]``): per-sample
          steps computed on the device each batch (FRL's per-class steps) without building a new
          attack, whose constructor checks a tensor's sign on the host.
        - labels: the true classes in targeted mode (only the targeted DLR loss needs them;
          default: the clean prediction).
        - check: validate the call first (outside ``torch.func`` transforms): ``x`` float,
          finite and in [0, 1], ``eps``/``step_size`` non-negative with one value per sample, the
          model's mode; one host synchronisation per call, none in the step loop. ``False``
          skips it (a hot loop that built ``x`` itself).
        - output: ``x_adv`` shaped like ``x``, in [0, 1] and in the eps-ball around ``x``.

    Logits in float16/bfloat16 (autocast) are cast to float32 before the loss; the step loop
    never calls ``.item()``.

    Examples::
        >>> attack = PGD("Linf", eps=8/255)                  # 10 steps of 2.5 eps / 10 = 2/255
        >>> x_adv = attack(model.eval(), x, y, seed=0)       # the same seed, the same x_adv
        >>> attack = PGD("linf", eps=8/255, step_size=2/255, steps=10)
        >>> x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
        >>> attack = PGD("l2", eps=0.5, step_size=0.125, steps=10, restarts=5)
        >>> x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
    """

    norm: str
    eps: threat.Budget
    step_size: threat.Budget | None = None
    steps: int = 10
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    targeted: bool = False
    early_stop: bool = False
    l1_quantile: float = 0.99
    compile: bool | None = None
    verdicts: ClassVar[bool] = True  # __call__(..., verdict=True) -> (x_adv, fooled)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", threat.norm_name(self.norm))
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1")
        if self.step_size is None and self.steps >= 1:  # Madry et al.: 2.5 eps / steps
            object.__setattr__(self, "step_size", 2.5 * self.eps / self.steps)
        if _negative(self.eps):
            raise ValueError(f"eps={self.eps} must be >= 0 (a {self.norm} radius in [0, 1] pixel units)")
        if _negative(self.step_size) or self.steps < 1:
            raise ValueError(f"step_size={self.step_size} must be >= 0 and steps={self.steps} >= 1")
        if self.restarts < 1:
            raise ValueError(f"restarts={self.restarts} must be >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; expected one of {sorted(LOSSES)}")
        if not 0.0 <= self.l1_quantile < 1.0:
            raise ValueError(f"l1_quantile={self.l1_quantile} must be in [0, 1)")

    @property
    def _restarts(self) -> int:
        return self.restarts if self.random_start else 1  # without noise every restart is the same

    def init_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Random-start noise for ``x`` (any leading dimensions, e.g. tasks ``[T, B, C, H, W]``),
        or ``None`` without random start.

        Shape ``x.shape``, or ``[*x.shape, restarts]`` with several restarts (last, so that
        ``noise[t]`` is task ``t``'s noise and vmap runs along dim 0). The noise is raw (see
        :func:`metarobust.attacks.threat.draw_noise`) and scaled by eps inside the call.
        """
        if not self.random_start:
            return None
        return threat.draw_noise(x, self.norm, generator, self._restarts)

    def __call__(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        loss: Loss | None = None,
        noise: torch.Tensor | None = None,
        *,
        eps: threat.Budget | None = None,
        labels: torch.Tensor | None = None,
        step_size: threat.Budget | None = None,
        verdict: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        check: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The adversarial examples, or with ``verdict`` ``(x_adv, fooled [B])``: ``fooled`` marks
        the points misclassified in the final batch of some restart, each batch scored whole. For a
        batch-coupled model (transductive batch norm) the returned per-sample best of the restarts
        is a mixture no restart produced, in which another point's change can un-fool a point;
        ``fooled`` still counts it (:meth:`metarobust.evaluation.harness.Unit.attacked_correct`).
        ``generator``/``seed`` and ``check``: see the class docstring."""
        x = x.detach()
        if self._compiled(forward):
            forward = compilation.compiled_forward(forward)
        if check and not inside_func_transform():  # once per call, never in the step loop
            threat.check_call(x, eps=self.eps if eps is None else eps,
                              step_size=self.step_size if step_size is None else step_size)
            threat.warn_if_training(forward)
        restarts = self._restarts
        if self.random_start:
            noise = threat.start_noise(noise, generator, seed, lambda g: self.init_noise(x, g), x.device)
            expected = tuple(x.shape) + ((restarts,) if restarts > 1 else ())
            if tuple(noise.shape) != expected:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected} "
                                 f"(attack.init_noise(x) with {restarts} restart(s))")
        budget = threat.per_sample(self.eps if eps is None else eps, x)
        step = threat.per_sample(self.step_size if step_size is None else step_size, x)
        losses = self._objective(forward, x, y, loss, labels)
        stop_early = self.early_stop and loss is None and losses[2] is not None
        if verdict:
            truth = self._true_labels(y, labels)

        if restarts == 1 and not verdict:
            delta, _ = self._run(forward, x, budget, step, noise, losses, stop_early, score=False)
            return (x + delta).clamp(0, 1)

        batch_loss, per_sample_loss, success = losses
        best = best_loss = best_success = fooled = None
        for r in range(restarts):
            delta, logits = self._run(forward, x, budget, step, noise if restarts == 1 else noise[..., r], losses,
                                      stop_early, score=True)
            value = per_sample_loss(logits).detach()
            won = success(logits) if success is not None else torch.zeros_like(value, dtype=torch.bool)
            wrong = logits.argmax(dim=-1) != truth if verdict else None
            if best is None:
                best, best_loss, best_success, fooled = delta, value, won, wrong
                continue
            better = (won & ~best_success) | ((won == best_success) & (value > best_loss))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best)
            best_loss = torch.where(better, value, best_loss)
            best_success = best_success | won
            fooled = fooled | wrong if verdict else None
        x_adv = (x + best).clamp(0, 1)
        return (x_adv, fooled) if verdict else x_adv

    def _true_labels(self, y: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The labels a verdict judges against: ``y``, or ``labels`` for a targeted attack."""
        if self.targeted:
            if labels is None:
                raise ValueError("verdict=True with a targeted PGD needs labels= (the true classes): "
                                 "y holds the targets")
            return labels
        if not _is_labels(y):
            raise ValueError("verdict=True needs class labels y (int64 [B]), not soft targets")
        return y

    # -- internals -------------------------------------------------------------------------

    def _objective(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, loss: Loss | None,
                   labels: torch.Tensor | None):
        """``(batch_loss, per_sample_loss, success)``: the scalar the steps ascend, its value per
        sample ``[B]`` (to pick the best restart) and ``success(logits) -> bool [B]`` (``None``
        when ``y`` are not class labels)."""
        if loss is not None:
            def batch_loss(logits):
                return loss(logits, y)

            def per_sample_loss(logits):  # a batch-sum loss, read per sample
                return torch.func.vmap(lambda z, t: loss(z.unsqueeze(0), t.unsqueeze(0)))(logits, y)
        else:
            if self.targeted:
                targeted_fn = TARGETED_LOSSES[self.loss]
                if labels is None and self.loss == "dlr":
                    with torch.no_grad():
                        labels = full_precision(forward(x)).argmax(dim=-1).detach()
                true = y if labels is None else labels

                def per_sample_loss(logits):
                    return targeted_fn(logits, true, y)
            else:
                fn = LOSSES[self.loss]

                def per_sample_loss(logits):
                    return fn(logits, y)

            def batch_loss(logits):
                return per_sample_loss(logits).sum()

        if not _is_labels(y):
            success = None
        elif self.targeted:
            def success(logits):
                return logits.argmax(dim=-1) == y
        else:
            def success(logits):
                return logits.argmax(dim=-1) != y
        return batch_loss, per_sample_loss, success

    def _compiled(self, forward: Forward) -> bool:
        """Whether this call runs the compiled step loop (``compile``; never inside ``vmap``)."""
        wanted = compilation.is_compiled(forward) if self.compile is None else self.compile
        return bool(wanted) and not inside_func_transform()

    def _run(self, forward, x, budget, step, noise, losses, stop_early, score):
        """One restart: ``(delta, logits)``, the logits of the final batch ``x + delta`` (only when
        ``score``, else ``None``)."""
        batch_loss, per_sample_loss, success = losses
        if self.random_start:
            delta = threat.random_start(x, noise, self.norm, budget).detach()
        else:
            delta = torch.zeros_like(x)

        def objective(d: torch.Tensor):
            logits = full_precision(forward(x + d))
            return batch_loss(logits), logits.detach()

        gradient = input_gradient(objective)
        shape = (-1,) + (1,) * (x.dim() - 1)
        # L1: spread a step over at least ceil(step) coordinates, none moving more than 1.
        min_coordinates = math.ceil(step) if isinstance(step, (int, float)) else 1
        if self.norm != "l1" and self._compiled(forward):
            # Budgets as tensors: the compiled update is one graph for every eps and step.
            update = compilation.compiled_function(pgd_update)
            step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
            budget = torch.as_tensor(budget, dtype=x.dtype, device=x.device)
        else:
            update = pgd_update
        for _ in range(self.steps):
            g, logits = gradient(delta)
            if self.norm == "l1":  # L1 skips coordinates the box blocks
                direction = threat.step_direction(g, self.norm, x + delta, self.l1_quantile, min_coordinates)
                moved = threat.project(delta + step * direction, x, self.norm, budget)
            else:
                moved = update(delta, g, x, step, budget, self.norm)
            if stop_early:  # keep a sample's first successful point
                moved = torch.where(success(logits).view(shape), delta, moved)
            delta = moved.detach()
        if not score:
            return delta, None
        with torch.no_grad():
            return delta, full_precision(forward((x + delta).clamp(0, 1))).detach()  # the point returned


def pgd_update(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, step: threat.Budget,
               eps: threat.Budget, norm: str) -> torch.Tensor:
    """One L-inf or L2 PGD move: ``delta + step * direction(grad)`` projected onto the
    ``eps``-ball, then onto the box [0, 1] around ``x`` (``delta``, ``grad``, ``x``: ``[B, ...]``;
    ``step``, ``eps``: floats, 0-dim or ``[B, 1, ..., 1]``). The step loop's body after the
    gradient, and the graph ``compile=True`` compiles."""
    moved = delta + step * threat.step_direction(grad, norm)
    return threat.project(moved, x, norm, eps)


def _negative(value: threat.Budget | None) -> bool:
    if value is None:
        return False
    if isinstance(value, torch.Tensor):
        return bool((value < 0).any())  # once, at construction
    return value < 0


def fgsm(norm: str, eps: threat.Budget, loss: str = "ce", targeted: bool = False) -> PGD:
    r"""FGSM in the paper 'Explaining and harnessing adversarial examples'
    [https://arxiv.org/abs/1412.6572]: one step of size eps from the clean input.

    Distance Measure : Linf (``sign(g)``), L2 (the fast gradient method ``g / ||g||``) or L1 (one
    SLIDE step). Never stops early, so it equals ``torchattacks.FGSM`` in L-inf.

    Examples::
        >>> x_adv = fgsm("linf", 8/255)(model, x, y)
    """
    return PGD(norm, eps, eps, 1, random_start=False, loss=loss, targeted=targeted, early_stop=False)


def fgsm_rs(norm: str, eps: threat.Budget, step_size: threat.Budget | None = None, loss: str = "ce",
            targeted: bool = False) -> PGD:
    r"""FGSM with random start in the paper 'Fast is better than free: Revisiting adversarial
    training' [https://arxiv.org/abs/2001.03994] (Wong, Rice & Kolter, ICLR 2020): a uniform
    random start in the ball, then one step of size ``1.25 eps`` (default), projected back.

    Distance Measure : Linf (L2, L1 by the same recipe)

    Examples::
        >>> attack = fgsm_rs("linf", 8/255)
        >>> x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
    """
    if step_size is None:
        step_size = 1.25 * eps
    return PGD(norm, eps, step_size, 1, random_start=True, loss=loss, targeted=targeted, early_stop=False)


@ATTACKS.register("pgd", "PGD (Madry et al. 2018) in attack.norm (linf/l2/l1), random start, restarts, "
                         "ce/dlr/cw loss, targeted")
def _pgd(cfg: AttackConfig) -> PGD:
    return PGD(cfg.norm, cfg.eps, cfg.step_size, cfg.steps, cfg.random_start, cfg.restarts, cfg.loss,
               cfg.targeted)


@ATTACKS.register("fgsm", "FGSM (Goodfellow et al. 2015): one step of size eps in attack.norm, "
                          "no random start")
def _fgsm(cfg: AttackConfig) -> PGD:
    return fgsm(cfg.norm, cfg.eps, cfg.loss, cfg.targeted)


@ATTACKS.register("fgsm_rs", "FGSM-RS (Wong et al. 2020): random start, one step of 1.25 eps in attack.norm")
def _fgsm_rs(cfg: AttackConfig) -> PGD:
    return fgsm_rs(cfg.norm, cfg.eps, loss=cfg.loss, targeted=cfg.targeted)


__all__ = ["PGD", "fgsm", "fgsm_rs", "inside_func_transform", "input_gradient", "pgd_update"]

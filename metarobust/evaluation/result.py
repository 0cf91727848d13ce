"""The one result of a robust evaluation, as ``eval.json`` holds it for few-shot and plain runs alike."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

Z_95 = 1.959964
"""The standard normal's 97.5 % quantile: a 95 % interval is ``mean ± Z_95 * standard error``."""

INTERVALS = ("episodes", "points")


@dataclass
class CheckResult:
    """One gradient-masking check (Carlini et al. 2019): its name, whether it passed, the numbers."""

    name: str
    passed: bool
    detail: str


@dataclass
class EvalResult:
    """Clean and robust accuracy of one model, with intervals, per class, checks and sweep.

    The schema of ``eval.json`` (:meth:`as_dict`; accuracies in [0, 1]):

    - ``run``, ``recipe``, ``dataset``, ``step`` (the checkpoint's step, ``None`` if unknown):
      what was scored. ``suite`` (``eval.suite``: ``single``, ``autoattack``...), ``norm``, ``eps``: the ``attack``
      section's threat model (``eval.union`` adds more; see ``after``).
    - ``clean_acc``, ``clean_ci95``: accuracy on the clean points and the half-width of its 95 %
      interval.
    - ``robust_acc``, ``robust_ci95``: the cascade's worst case: a point counts only if it is
      classified correctly clean *and* after every attack of the suite, in every threat model.
    - ``after``, ``after_ci95``: ``{label: accuracy}`` after each attack of the cascade, in order
      (``"linf/pgd-10"``, ``"linf/apgd-ce"``, ``"linf/apgd-t"``, ``"l2/pgd-10"``...); the last equals
      ``robust_acc``. One entry means the suite is one attack.
    - ``interval``: how the intervals are computed. ``"episodes"`` (few-shot): accuracies are
      means over ``episodes`` of the per-episode accuracy, ± ``1.96 s / sqrt(E)`` with ``s`` the
      standard deviation over episodes, as the field reports; ``"points"`` (plain classifier):
      the binomial (Wald) half-width ``1.96 sqrt(p (1 - p) / n)`` over the ``points`` test images.
    - ``episodes`` (few-shot; ``None`` for a plain classifier) and ``points`` (query points or test
      images scored).
    - ``per_class``: ``{class name: {"points", "clean_acc", "robust_acc"}}`` over every point of
      that class (few-shot: every query point of the class, whichever episodes drew it).
    - ``checks``: ``[{"name", "passed", "detail"}]``, the gradient-masking checks; ``eps_sweep``:
      ``[{"eps", "robust_acc"}]``, robust accuracy under the ``attack`` section at multiples of
      its eps; both on the first ``check_points`` points (0: not run).
    - ``plot``: the eps sweep's PNG when it was written, else ``None``.
    - ``verdicts``: ``{"clean", "robust", <attack label>...: "0110..."}``, one character per
      point in the order the points were scored (a plain classifier: the ``eval.points`` subset,
      :func:`~metarobust.evaluation.classifier.evaluation_points`; few-shot: the query points of
      the episodes in order), ``"1"`` where the point was classified correctly clean, after the
      whole cascade, after that attack. Two runs scored on the same points can be compared point
      by point (:func:`point_verdicts`, :func:`~metarobust.evaluation.paired.paired_comparison`).

    Keys of ``extra`` (e.g. ``train_seconds``, ``stopped``) are added after these and never
    replace one of them.

    Example:
        >>> result = evaluate_run(cfg, model, stores.test, manifest=manifest)
        >>> result.robust_acc, result.robust_ci95, result.after
        (0.509, 0.031, {'linf/pgd-10': 0.509})
    """

    clean_acc: float
    clean_ci95: float
    robust_acc: float
    robust_ci95: float
    after: dict[str, float]
    after_ci95: dict[str, float]
    interval: str
    points: int
    episodes: int | None = None
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    eps_sweep: list[dict[str, float]] = field(default_factory=list)
    check_points: int = 0
    run: str | None = None
    recipe: str = ""
    dataset: str = ""
    step: int | None = None
    suite: str = "single"
    norm: str = "linf"
    eps: float = 0.0
    plot: str | None = None
    verdicts: dict[str, str] = field(default_factory=dict, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS:
            raise ValueError(f"interval={self.interval!r}; expected one of {INTERVALS}")

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able dict of ``eval.json``: the schema's keys, then ``extra``'s other keys."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["checks"] = [asdict(c) for c in self.checks]
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


def encode_verdicts(mask: torch.Tensor) -> str:
    """A bool mask ``[N]`` (or any shape, flattened) as a string of ``"0"``/``"1"`` (``eval.json``'s
    ``verdicts``)."""
    return (mask.flatten().cpu().to(torch.uint8) + ord("0")).numpy().tobytes().decode("ascii")


def point_verdicts(summary: EvalResult | dict[str, Any], key: str = "robust") -> torch.Tensor:
    """Per-point verdicts of an evaluation (an :class:`EvalResult` or its ``eval.json`` dict) as a
    bool tensor ``[N]``: ``key`` is ``"clean"``, ``"robust"`` (the whole cascade) or an attack label
    of ``after`` (``"linf/pgd-20"``...).

    Example:
        >>> a = point_verdicts(json.loads(Path("runs/trades/eval.json").read_text()))
        >>> b = point_verdicts(json.loads(Path("runs/pgd_at/eval.json").read_text()))
        >>> paired_comparison(a, b).p_value
    """
    verdicts = summary.verdicts if isinstance(summary, EvalResult) else summary.get("verdicts") or {}
    if key not in verdicts:
        raise KeyError(f"no per-point verdicts {key!r} in this evaluation (it has {sorted(verdicts)}; evaluations "
                       f"written before metarobust recorded them have none: score the run again)")
    return torch.frombuffer(bytearray(verdicts[key].encode("ascii")), dtype=torch.uint8) == ord("1")


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values [E]`` and the half-width ``1.96 s / sqrt(E)`` of its 95 % interval
    (``s``: the unbiased standard deviation; ``nan`` for a single value)."""
    values = values.double()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), Z_95 * float(values.std(unbiased=True)) / math.sqrt(values.numel())


def binomial_ci95(correct: int, total: int) -> tuple[float, float]:
    """Accuracy ``correct / total`` and the Wald half-width ``1.96 sqrt(p (1 - p) / n)``."""
    p = correct / total
    return p, Z_95 * math.sqrt(p * (1 - p) / total)

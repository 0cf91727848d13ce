"""One evaluation for few-shot learners and plain classifiers.

- :func:`evaluate_run` (``run.py``): what ``metarobust train`` ends with and ``metarobust eval``
  re-runs; writes ``eval.json`` (:class:`EvalResult`, ``result.py``, whose docstring is the schema).
- The harness (``harness.py``): :class:`Unit` s, the survivor cascade, the gradient-masking
  checks and the eps sweep.
- Units: few-shot (``fewshot.py``: frozen episodes fitted by the recipe's evaluation learner) and
  plain classifiers (``classifier.py``).
- One rendering (``report.py``): ``report.md``, the console table and the JSON headline.
- Paired comparisons (``paired.py``): two models on the same points, McNemar's exact test and an
  interval for the difference, from the per-point ``verdicts`` of ``eval.json``.
- One call for your own model (``robust.py``): :func:`robust_accuracy` (also
  ``metarobust.robust_accuracy``), plain-classifier units through the same harness.

Layering: this package imports data, models, attacks, meta, config, runs and plots; never
``metarobust.training`` or the command line.
"""

from metarobust.evaluation.classifier import classifier_unit, classifier_units
from metarobust.evaluation.fewshot import Learner, adapted_episodes, fewshot_units
from metarobust.evaluation.harness import Unit, evaluate_units
from metarobust.evaluation.paired import PairedComparison, paired_comparison
from metarobust.evaluation.report import console_table, headline, render_report, robust_name
from metarobust.evaluation.result import CheckResult, EvalResult, point_verdicts
from metarobust.evaluation.robust import RobustAccuracy, robust_accuracy
from metarobust.evaluation.run import evaluate_run

__all__ = ["CheckResult", "EvalResult", "Learner", "PairedComparison", "RobustAccuracy", "Unit", "adapted_episodes", "classifier_unit", "classifier_units",
           "console_table", "evaluate_run", "evaluate_units", "fewshot_units", "headline",
           "paired_comparison", "point_verdicts", "render_report", "robust_accuracy", "robust_name"]

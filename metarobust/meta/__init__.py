"""Meta-learning as pure functions: functional models, MAML/ANIL, the RFS probe, loop and vmap.

- ``functional.py``: models as functions of a parameter dict (``functional_forward``, ``params_of``).
- ``maml.py``: :class:`MAML` (ANIL with ``adapted=head_names(model)``), the inner loop.
- ``batch_norm.py``: :func:`convert_batch_norm` for a user's model with ``nn.BatchNorm2d``.
- ``logistic.py``: RFS's logistic-regression probe on frozen features.
- ``execution.py``: one task function run per task in a loop or under ``torch.func.vmap``.

Example:
    >>> from metarobust.meta import MAML, convert_batch_norm, params_of
    >>> model = convert_batch_norm(my_model)            # nn.BatchNorm2d -> batch-statistics BN
    >>> maml = MAML(model, inner_lr=0.01, inner_steps=5)
    >>> fast = maml.adapt(params_of(model), support_x, support_y)
    >>> query_logits = maml.forward(fast, query_x)
"""

from metarobust.meta.batch_norm import convert_batch_norm, running_batch_norms
from metarobust.meta.execution import EXECUTIONS, meta_backward, resolve_execution, run_tasks
from metarobust.meta.functional import (
           FunctionalForward,
           Params,
           bind,
           detached,
           functional_forward,
           params_of,
)
from metarobust.meta.logistic import LogisticProbe, feature_extractor, fit_logistic_regression
from metarobust.meta.maml import ADAPT_MODES, MAML, adapted_names, cross_entropy_step, head_names

__all__ = ["ADAPT_MODES", "EXECUTIONS", "MAML", "FunctionalForward", "LogisticProbe", "Params", "adapted_names",
           "bind", "convert_batch_norm", "cross_entropy_step", "detached", "feature_extractor",
           "fit_logistic_regression", "functional_forward", "head_names", "meta_backward", "params_of",
           "resolve_execution", "run_tasks", "running_batch_norms"]

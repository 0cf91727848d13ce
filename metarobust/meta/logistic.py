"""RFS's few-shot learner: multinomial logistic regression on L2-normalised frozen features.

Tian et al., "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?"
(ECCV 2020): after plain pre-training on all meta-training classes, each test episode fits a
logistic regression (scikit-learn, L2 penalty, C = 1, L-BFGS) on the L2-normalised penultimate
features of its support set and classifies the query set with it.

Here the regression is fitted in torch by Newton's method with a fixed number of steps, so it
runs on the device, under ``vmap`` over episodes, and is differentiable end to end: an attack on
the query set goes through the features *and* the fitted head (and, if one wanted, through the
fit itself). It minimises scikit-learn's objective exactly (tested against
``sklearn.linear_model.LogisticRegression``)::

    C * sum_i CE(W x_i + b, y_i) + 1/2 ||W||_F^2          (intercepts b not penalised)

Newton's Hessian has ``N * (P + 1)`` rows, ``P`` the feature dimension; when the support set has
fewer points ``M`` than features, the weights are written ``W = A X`` (the representer theorem:
the optimum lies in the span of the support features) and Newton runs on ``A``, ``N * (M + 1)``
rows, so a 640-dimensional ResNet-12 embedding costs no more than a 25-point support set.

What RFS also does and is left out here: the 5x augmented copies of each support image
(random crop, colour jitter, flip; documented in ``docs/robust_meta_learning.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.errors import ConfigError
from metarobust.meta.functional import Params

RIDGE = 1e-6
"""Added to Newton's Hessian: the softmax's shift-invariant intercept direction (and, in the
dual form, directions outside the span of the features) have zero curvature."""


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float = 1.0,
                            steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by ``steps`` Newton steps from zero.

    Args:
        x: ``[M, D]`` features of the ``M`` training points.
        y: ``int64 [M]`` labels in ``0 .. classes - 1``.
        classes: ``N``, the number of classes (fixed, so the call works under ``vmap``).
        c: inverse regularisation strength (scikit-learn's ``C``; RFS: 1).
        steps: Newton steps (quadratic convergence: 5 already matched scikit-learn to 1e-7 on
            normalised features in the tests; 10 by default).

    Returns:
        ``(W [N, D], b [N])``, logits ``x @ W.T + b``. Differentiable in ``x``.

    Example:
        >>> w, b = fit_logistic_regression(F.normalize(features, dim=-1), labels, classes=5)
        >>> probabilities = torch.softmax(query @ w.T + b, dim=-1)
    """
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [M, D] and y [M]; got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(dtype)
    m, d = x.shape
    ones = torch.ones(m, 1, dtype=dtype, device=x.device)
    dual = m < d
    if dual:  # W = A X: the design is the Gram matrix, the penalty tr(A G A^T)
        gram = x @ x.T
        design = torch.cat([gram, ones], dim=1)
        penalty = F.pad(gram, (0, 1, 0, 1))
    else:
        design = torch.cat([x, ones], dim=1)
        penalty = torch.diag(F.pad(torch.ones(d, dtype=dtype, device=x.device), (0, 1)))
    p = design.shape[1]
    targets = (y.unsqueeze(1) == torch.arange(classes, device=y.device)).to(dtype)  # one-hot, vmap-safe
    eye_n = torch.eye(classes, dtype=dtype, device=x.device)
    curvature = torch.kron(eye_n, penalty) + RIDGE * torch.eye(classes * p, dtype=dtype, device=x.device)
    theta = torch.zeros(classes, p, dtype=dtype, device=x.device)
    for _ in range(steps):
        probs = torch.softmax(design @ theta.T, dim=1)  # [M, N]
        grad = c * (probs - targets).T @ design + theta @ penalty  # [N, P]
        # Hessian of the CE part: sum_i (diag(p_i) - p_i p_i^T) (x) phi_i phi_i^T
        weights = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)  # [M, N, N]
        hessian = c * torch.einsum("mab,mi,mj->aibj", weights, design, design).reshape(classes * p, classes * p)
        step = torch.linalg.solve(hessian + curvature, grad.reshape(-1))
        theta = theta - step.view(classes, p)
    weight = theta[:, :-1] @ x if dual else theta[:, :-1]
    return weight, theta[:, -1]


@dataclass(frozen=True)
class LogisticProbe:
    """RFS's per-episode learner, with MAML's two verbs (``adapt``, ``forward``).

    Args:
        features: ``x [B, C, H, W] -> [B, D]``, the frozen backbone's penultimate features
            (e.g. ``model.features``).
        ways: N, the classes of an episode.
        c: scikit-learn's ``C`` (RFS: 1).
        steps: Newton steps of the fit.
        normalize: L2-normalise the features (RFS: yes).

    ``adapt(params, x, y)`` fits the head on the support set and returns it as fast weights
    ``{"weight": [N, D], "bias": [N]}`` (``params`` is unused: the backbone is frozen);
    ``forward(fast, x)`` scores inputs through the features and the fitted head, so an attack
    on ``forward`` attacks the whole pipeline.

    Example:
        >>> probe = LogisticProbe(model.features, ways=5)
        >>> head = probe.adapt({}, support_x, support_y)
        >>> logits = probe.forward(head, query_x)
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    ways: int
    c: float = 1.0
    steps: int = 10
    normalize: bool = True

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(1)
        return F.normalize(f, dim=-1) if self.normalize else f

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        weight, bias = fit_logistic_regression(self.embed(x), y, self.ways, self.c, self.steps)
        return {"weight": weight, "bias": bias}

    def forward(self, fast: Params, x: torch.Tensor) -> torch.Tensor:
        f = self.embed(x)
        return F.linear(f, fast["weight"].to(f.dtype), fast["bias"].to(f.dtype))


def feature_extractor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model.features``, the penultimate features every metarobust model exposes."""
    features = getattr(model, "features", None)
    if not callable(features):
        raise ConfigError(f"the RFS probe needs the model's penultimate features; {type(model).__name__} "
                          f"has no `features(x)` method; choose a model.name that has one (conv4, resnet12)")
    return features

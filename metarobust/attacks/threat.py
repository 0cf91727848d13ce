"""Threat models: the L-inf, L2 and L1 balls intersected with the image box [0, 1].

Everything an iterative attack needs from its norm, as pure tensor functions that work per
sample on a batch ``[B, ...]`` (every dimension after the first is one sample), never
synchronise with the host, and run under ``torch.func.vmap``:

- :func:`lp_norm`: the per-sample norm ``[B]``.
- :func:`project`: onto the eps-ball (L-inf: clamp; L2: rescale; L1: the exact Euclidean
  projection of Duchi et al., ICML 2008, sort-based), then onto the box ``x + delta in [0, 1]``.
  Clamping to the box only shrinks coordinates towards zero, so the result stays in the ball.
- :func:`step_direction`: the steepest-ascent direction of unit norm for the norm's dual
  (L-inf: ``sign(g)``; L2: ``g / ||g||_2``; L1: SLIDE's sparse step, Tramer & Boneh,
  NeurIPS 2019: the signs of the top-``q`` quantile of ``|g|``, normalised to unit L1 norm,
  skipping coordinates the box blocks).
- :func:`draw_noise` / :func:`unit_ball_point`: the random start. Raw noise is drawn with a
  ``torch.Generator`` *outside* any vmap (shaped like ``x``, so it can carry leading task
  dimensions) and turned into a point of the unit ball per sample inside the attack:
  L-inf: uniform in the cube; L2: a uniform direction on the sphere times a radius
  ``~ U(0, 1)`` (as torchattacks' PGDL2); L1: a uniform direction on the L1 sphere (normalised
  i.i.d. Laplace) times a radius ``~ U(0, 1)``. The radius is read off the draw itself: the norm
  of a Gaussian (Laplace) vector is independent of its direction and its CDF (chi-square,
  resp. Gamma) maps it to an independent ``U(0, 1)``, so the noise stays one tensor like ``x``.

``eps`` (and step sizes) may be a float or a per-sample tensor ``[B]``; :func:`per_sample`
broadcasts it to ``[B, 1, ..., 1]``.

What an attack's public call checks before its step loop (never inside it, never under
``vmap``): :func:`norm_name` (the norm, case-insensitive), :func:`check_call` (images in [0, 1]
and finite, budgets non-negative with one value per sample: one host synchronisation),
:func:`warn_if_training` (a module in train mode), and :func:`seeded` (a generator from a seed).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable

import torch
from torch import nn

from metarobust.config import NORMS
from metarobust.errors import ConfigError, DataError

Budget = float | torch.Tensor


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
    return norm


def norm_name(norm: str, name: str = "norm") -> str:
    """``norm`` as the attacks spell it, case, dashes and underscores ignored: ``"Linf"``,
    ``"L-inf"``, ``"LINF"`` and ``"inf"`` give ``"linf"``; ``"L2"`` gives ``"l2"``.
    :class:`ConfigError` naming ``name`` otherwise."""
    key = norm.lower().replace("-", "").replace("_", "") if isinstance(norm, str) else norm
    key = "linf" if key == "inf" else key
    if key not in NORMS:
        raise ConfigError(f"{name}={norm!r}; expected one of {', '.join(NORMS)} (case-insensitive: "
                          f"'Linf', 'L2' and 'L1' work too)")
    return key


class TrainModeWarning(UserWarning):
    """An attack ran on a module in train mode: its BatchNorm layers used batch statistics and
    overwrote their running statistics with those of the adversarial batch, and dropout was on.
    Call ``model.eval()`` first; a recipe that attacks in train mode on purpose runs it under
    ``bn_mode(model, "train")``, which silences this warning."""


def train_mode_layers(forward: object, kinds: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,
                                                                   nn.modules.dropout._DropoutNd)) -> list[str]:
    """Class names of the layers of ``forward`` (if a module) that are in train mode and of one of
    ``kinds`` (default: BatchNorm, dropout, whose train mode changes what they compute). Host-side
    only: the root's ``training`` flag is read first, so an eval-mode model costs one attribute read."""
    if not isinstance(forward, nn.Module) or not forward.training:
        return []
    return sorted({type(m).__name__ for m in forward.modules() if m.training and isinstance(m, kinds)})


def warn_if_training(forward: object, stacklevel: int = 3) -> None:
    """Warn (:class:`TrainModeWarning`) when ``forward`` is a module with BatchNorm or dropout
    layers in train mode (:func:`train_mode_layers`)."""
    layers = train_mode_layers(forward)
    if layers:
        warnings.warn(f"the attacked model is in train mode ({', '.join(layers)}): BatchNorm running "
                      f"statistics are overwritten by the adversarial batch and dropout is active; call "
                      f"model.eval() before attacking it", TrainModeWarning, stacklevel=stacklevel)


def check_call(x: torch.Tensor, **budgets: Budget | None) -> None:
    """Check an attack's inputs once, at its public entry: ``x`` float, finite and in [0, 1];
    each budget (``eps``, ``step_size``...; ``None`` skipped) a number or a tensor of one value
    per sample ``[B]`` (or 0-dim), non-negative.

    The minimum and maximum of ``x`` and of the tensor budgets are read in one host
    synchronisation. Raises :class:`DataError` for the images, :class:`ConfigError` for a budget,
    each naming the value and the fix.
    """
    if not torch.is_floating_point(x):
        raise DataError(f"x has dtype {x.dtype}; attacks take float images in [0, 1] "
                        f"(uint8 images: x.float() / 255)")
    batch = x.shape[0] if x.dim() else 1
    reads, tensors = [], []
    for name, value in budgets.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
                raise ConfigError(f"{name} has shape {tuple(value.shape)}; expected a number, a 0-dim tensor "
                                  f"or one value per sample, shape [{batch}] for x of shape {tuple(x.shape)}")
            if value.numel():
                tensors.append(name)
                reads.append(value.detach().amin().to(device=x.device, dtype=torch.float32))
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name}={value!r}; expected a number or a tensor of shape [{batch}]")
        elif not value >= 0:  # NaN too
            raise ConfigError(f"{name}={value}; expected a radius >= 0 in [0, 1] pixel units")
    if x.numel():
        reads = [x.detach().amin().float(), x.detach().amax().float()] + reads
    if not reads:
        return
    values = torch.stack(reads).tolist()  # the call's one host synchronisation
    if x.numel():
        low, high = values[:2]
        values = values[2:]
        if math.isnan(low) or math.isnan(high):
            raise DataError("x contains NaN; attacks need finite images in [0, 1]")
        if low < 0 or high > 1:
            raise DataError(f"x has values in [{low:.4g}, {high:.4g}]; attacks expect images in [0, 1] "
                            f"(eps is in [0, 1] pixel units): divide 0-255 images by 255 and put the "
                            f"normalisation inside the model, e.g. nn.Sequential("
                            f"metarobust.models.layers.Normalize(mean, std), model)")
    for name, low in zip(tensors, values):
        if not low >= 0:
            raise ConfigError(f"{name} has an entry {low:g}; every per-sample {name} must be >= 0")


def start_noise(noise: torch.Tensor | None, generator: torch.Generator | None, seed: int | None,
                draw: Callable[[torch.Generator], torch.Tensor], device: torch.device) -> torch.Tensor:
    """An attack's random-start noise: ``noise`` as passed, or ``draw(generator)`` with the
    generator :func:`seeded` gives on ``device`` (``draw``: the attack's ``init_noise`` on ``x``)."""
    if noise is None:
        return draw(seeded(generator, seed, device))
    if generator is not None or seed is not None:
        raise ConfigError("pass noise= or generator=/seed=, not both")
    return noise


def seeded(generator: torch.Generator | None, seed: int | None, device: torch.device) -> torch.Generator:
    """The generator an attack draws its random starts from: ``generator``, or a new one on
    ``device`` seeded with ``seed`` (the same seed gives the same draws). One of them is needed."""
    if generator is not None and seed is not None:
        raise ConfigError("pass generator= or seed=, not both")
    if generator is not None:
        return generator
    if seed is None:
        raise ConfigError("a random start needs seed=<int>, generator=<torch.Generator>, or "
                          "noise=attack.init_noise(x, generator)")
    return torch.Generator(device=device).manual_seed(int(seed))


def expand_per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value [B]`` as ``[B, 1, ..., 1]`` to broadcast against ``like [B, ...]`` (dtype kept: a
    bool mask stays a mask)."""
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def per_sample(value: Budget, x: torch.Tensor) -> Budget:
    """A float as is; a tensor ``[B]`` in ``x``'s dtype as ``[B, 1, ..., 1]`` to broadcast against
    ``x [B, ...]`` (a 0-dim tensor is returned unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return expand_per_sample(value.to(device=x.device, dtype=x.dtype), x)
    return value


def _flat(value: Budget) -> Budget:
    """A per-sample budget ``[B, 1, ..., 1]`` as ``[B, 1]`` (floats unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 1:
        return value.reshape(value.shape[0], 1)
    return value


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm ``[B]`` of ``delta [B, ...]``."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise ValueError(f"norm={norm!r}; expected one of {NORMS}")


def project_l1_ball(delta: torch.Tensor, eps: Budget) -> torch.Tensor:
    """Exact Euclidean projection of each sample of ``delta [B, ...]`` onto ``{||d||_1 <= eps}``.

    Duchi, Shalev-Shwartz, Singer & Chandra, "Efficient projections onto the l1-ball for
    learning in high dimensions", ICML 2008, Fig. 1 (sort-based, ``O(n log n)`` per sample):
    ``w = sign(v) * max(|v| - theta, 0)`` with ``theta = max(0, (sum_{j<=rho} mu_j - eps) / rho)``,
    ``mu`` the sorted ``|v|`` and ``rho`` the number of ``j`` with ``mu_j > (sum_{i<=j} mu_i - eps) / j``.
    Points already inside the ball get ``theta = 0`` and are returned unchanged.
    """
    v = delta.flatten(1)
    a = v.abs()
    eps = _flat(eps)
    mu = a.sort(dim=1, descending=True).values
    css = mu.cumsum(dim=1)
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = (mu * j > css - eps).sum(dim=1, keepdim=True).clamp_min(1)  # the condition holds on a prefix
    theta = ((css.gather(1, rho - 1) - eps) / rho.to(v.dtype)).clamp_min(0)
    return (v.sign() * (a - theta).clamp_min(0)).view_as(delta)


def project_ball(delta: torch.Tensor, norm: str, eps: Budget) -> torch.Tensor:
    """``delta`` projected onto the ``norm`` ball of radius ``eps`` (float, or ``[B, 1, ..., 1]``)."""
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            return torch.maximum(torch.minimum(delta, eps), -eps)
        return delta.clamp(-eps, eps)
    if norm == "l2":
        n = lp_norm(delta, "l2").view(-1, *([1] * (delta.dim() - 1)))
        return delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    if norm == "l1":
        return project_l1_ball(delta, eps)
    raise ValueError(f"norm={norm!r}; expected one of {NORMS}")


def clip_to_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The perturbation that keeps ``x + delta`` inside the image box [0, 1]."""
    return (x + delta).clamp(0, 1) - x


def project(delta: torch.Tensor, x: torch.Tensor, norm: str, eps: Budget) -> torch.Tensor:
    """Onto the eps-ball, then onto the box: the result is in both (box clamping only shrinks
    each coordinate towards 0 since ``x`` is in [0, 1])."""
    return clip_to_box(x, project_ball(delta, norm, eps))


def step_direction(grad: torch.Tensor, norm: str, x_adv: torch.Tensor | None = None,
                   l1_quantile: float = 0.99, l1_min_coordinates: int = 1) -> torch.Tensor:
    """Steepest-ascent direction of unit ``norm`` for the gradient ``grad [B, ...]``.

    Args:
        grad: the loss gradient w.r.t. the input.
        norm: ``linf`` (``sign(g)``), ``l2`` (``g / ||g||_2``) or ``l1`` (SLIDE, see below).
        x_adv: the current point; for L1, coordinates where the box blocks the move
            (``x_adv >= 1`` and ``g > 0``, or ``x_adv <= 0`` and ``g < 0``) are left out.
        l1_quantile: SLIDE's ``q``: only coordinates with ``|g_i|`` at or above the ``q``
            quantile of ``|g|`` move (0.99: the top 1 %, at least one), each by
            ``sign(g_i) / k`` for ``k`` of them (unit L1 norm). A zero gradient gives no move.
        l1_min_coordinates: move at least this many coordinates (PGD passes ``ceil(step_size)``
            so that no coordinate is asked to move by more than the box's width, 1).
    """
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        n = lp_norm(grad, "l2").view(-1, *([1] * (grad.dim() - 1)))
        return grad / (n + 1e-12)
    if norm != "l1":
        raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
    g = grad.flatten(1)
    a = g.abs()
    if x_adv is not None:
        xa = x_adv.flatten(1)
        blocked = ((xa >= 1) & (g > 0)) | ((xa <= 0) & (g < 0))
        a = a.masked_fill(blocked, 0)
    n = a.shape[1]
    k = min(n, max(1, l1_min_coordinates, round((1.0 - l1_quantile) * n)))
    threshold = a.topk(k, dim=1).values[:, -1:]
    keep = (a >= threshold) & (a > 0)
    e = g.sign() * keep
    return (e / e.abs().sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)


def draw_noise(x: torch.Tensor, norm: str, generator: torch.Generator | None = None,
               restarts: int = 1) -> torch.Tensor:
    """Raw random-start noise for ``x`` (any leading dimensions, e.g. ``[T, B, C, H, W]``).

    Shape ``x.shape`` for one restart, ``[*x.shape, restarts]`` for several (the restarts
    dimension is last so that leading task dimensions still index tasks and vmap along dim 0).
    L-inf: uniform in [-1, 1]; L2: standard normal; L1: standard Laplace. Turn one restart's
    draw into a point of the unit ball with :func:`unit_ball_point`.
    """
    check_norm(norm)
    shape = tuple(x.shape) + ((restarts,) if restarts > 1 else ())
    if norm == "l2":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    w = 2 * torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) - 1
    if norm == "linf":
        return w
    # Laplace by inversion of its CDF: sign(w) * Exp(1), the magnitude clamped to stay finite.
    return w.sign() * -torch.log1p(-w.abs().clamp(max=1 - 1e-7))


def reference_draws(x: torch.Tensor, norm: str, runs: int, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """AutoAttack's random-start draws for ``runs`` runs, ``[*x.shape, runs]``: ``2 u - 1`` with
    ``u`` uniform (L-inf), standard normal (L2, L1). Drawn run-major, so run ``r`` gets the numbers
    the reference draws for its restart ``r`` (APGD and FAB map them into the ball in the call)."""
    shape = (runs, *x.shape)
    if norm == "linf":
        t = 2 * torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype) - 1
    else:
        t = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    return t.movedim(0, -1)


def unit_ball_point(noise: torch.Tensor, norm: str) -> torch.Tensor:
    """A point of the unit ``norm`` ball per sample from one restart's raw ``noise [B, ...]``
    (see :func:`draw_noise`); multiply by eps for the eps-ball."""
    if norm == "linf":
        return noise
    flat = noise.flatten(1)
    n = flat.shape[1]
    if norm == "l2":
        r2 = flat.double().pow(2).sum(dim=1)
        # ||g||^2 ~ chi2(n), independent of g/||g||: its CDF is a U(0, 1) radius.
        radius = torch.special.gammainc(torch.full_like(r2, n / 2), r2 / 2)
        length = r2.sqrt()
    elif norm == "l1":
        r1 = flat.double().abs().sum(dim=1)
        # ||l||_1 ~ Gamma(n, 1), independent of l/||l||_1 (uniform on the L1 sphere).
        radius = torch.special.gammainc(torch.full_like(r1, n), r1)
        length = r1
    else:
        raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
    scale = (radius / length.clamp_min(1e-30)).to(noise.dtype)
    return noise * scale.view(-1, *([1] * (noise.dim() - 1)))


def random_start(x: torch.Tensor, noise: torch.Tensor, norm: str, eps: Budget) -> torch.Tensor:
    """The starting perturbation ``delta`` from one restart's raw noise: in the eps-ball and
    with ``x + delta`` in [0, 1]."""
    return project(per_sample(eps, x) * unit_ball_point(noise, norm), x, norm, per_sample(eps, x))


def in_threat_model(x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: Budget,
                    rtol: float = 1e-5, atol: float = 1e-6) -> torch.Tensor:
    """Per sample ``[B]`` (bool): ``x_adv`` in [0, 1] and ``||x_adv - x|| <= eps`` up to rounding."""
    eps_flat = eps.reshape(-1) if isinstance(eps, torch.Tensor) else eps
    inside = lp_norm(x_adv - x, norm) <= eps_flat * (1 + rtol) + atol
    box = (x_adv.flatten(1) >= 0).all(dim=1) & (x_adv.flatten(1) <= 1).all(dim=1)
    return inside & box


__all__ = ["NORMS", "TrainModeWarning", "check_call", "check_norm", "clip_to_box", "draw_noise", "expand_per_sample",
           "in_threat_model", "lp_norm", "norm_name", "per_sample", "project", "project_ball", "project_l1_ball",
           "random_start", "seeded", "start_noise", "step_direction", "train_mode_layers", "unit_ball_point",
           "warn_if_training"]

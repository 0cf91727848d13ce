"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based, no gradients.

A transcription of the reference code (``square.py`` of AutoAttack, ``SquareAttack``) into the
calling convention of the other attacks, written so that it can sit behind a query oracle:

- **Scores only.** The model is called forward, under ``torch.no_grad()``, to read its logits
  (margin and loss); never differentiated. Every call goes through one method,
  :meth:`Square.scores`.
- **Queries counted per example.** :meth:`Square.run` returns, per example, the queries it spent:
  one for the random initial point, then one per iteration while the example is still being
  attacked. An example stops (early stop) once it is misclassified or its budget is spent;
  budgets may differ per example (``max_queries=[B]``), as may the radius (``eps=[B]``).
- **Functional and batched.** The batch is never sliced: each iteration scores the whole batch
  and an example that has stopped keeps its point and its count (a model whose predictions
  couple its batch, transductive batch norm, keeps seeing the whole batch). Every random number
  comes from a counter-based hash of a per-example key drawn by :meth:`Square.init_noise` from a
  ``torch.Generator``, so an example's squares depend only on its key (not on the batch, not on
  which examples are still running), there is no global RNG, and the loop runs under
  ``torch.func.vmap`` with no host synchronisation except a check every few iterations whether
  any example is still running (skipped under ``vmap``). The scores of stopped examples are
  computed with the batch and discarded, never charged: an oracle that charges every example it
  is shown should wrap :meth:`Square.scores` and charge only the running ones.

Differences from the reference, none of which changes the algorithm: the square's position and
orientation are drawn per example (the reference draws one per iteration for the whole batch),
and ``queries`` is the total per example including the initial point (the reference's
``n_queries`` counts iterations after it, so spends at most ``n_queries + 1``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.attacks import threat
from metarobust.attacks.apgd import l1_projection
from metarobust.attacks.pgd import inside_func_transform
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig
from metarobust.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]
SQUARE_NORMS = ("linf", "l2", "l1")
CHECK_EVERY = 10
"""Iterations between the host checks whether any example is still running."""

_M32 = 0xFFFFFFFF


# -- counter-based random numbers: vmappable, no generator state, per-example streams -----------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for ``x`` in [0, 2^32) held in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (C. Wellons' ``lowbias32``)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(key: torch.Tensor, counter: int, width: int) -> torch.Tensor:
    """``width`` numbers uniform in [0, 1) per example of ``key int64 [B]``, number ``counter``
    of its stream: ``[B, width]`` in float64 (a pure function of key and counter)."""
    index = (torch.arange(width, device=key.device, dtype=torch.int64) + counter * width) & _M32
    bits = _mix32(_mix32(key[:, None] ^ _mix32(index)[None, :]) ^ 0x5BD1E995)
    return bits.to(torch.float64) / 2.0 ** 32


def _sign(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0.5, -1.0, 1.0)


# -- the L2 square's profile (the reference's eta) ------------------------------------------------
def _rectangles(rows: int, cols: int, norm: str) -> torch.Tensor:
    """The reference's ``eta_rectangles``: nested rectangles weighted ``1 / (k + 1)^2`` (L2) or
    ``1 / (k + 1)^4`` (L1), of unit norm."""
    delta = torch.zeros(rows, cols, dtype=torch.float64)
    power = 2 if norm == "l2" else 4
    r, c = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(r, 0):min(r + 2 * k + 1, rows), max(0, c):min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** power
        r, c = r - 1, c - 1
    return delta / _size(delta, norm)


def _size(t: torch.Tensor, norm: str) -> torch.Tensor:
    return t.pow(2).sum().sqrt() if norm == "l2" else t.abs().sum()


@functools.lru_cache(maxsize=64)
def eta(s: int, norm: str = "l2") -> torch.Tensor:
    """The square's profile ``[s, s]`` in L2 or L1 (the reference's ``eta`` before its random
    transpose): the upper half positive, the lower half negative, unit norm. float64, on the CPU."""
    delta = torch.zeros(s, s, dtype=torch.float64)
    if s // 2 > 0:
        delta[: s // 2] = _rectangles(s // 2, s, norm)
    delta[s // 2:] = -_rectangles(s - s // 2, s, norm)
    return delta / _size(delta, norm)


def p_selection(p_init: float, it: int, queries: int, rescale: bool) -> float:
    """The fraction of pixels a square covers at iteration ``it`` (the reference's schedule:
    halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000; ``rescale``
    stretches it from 10,000 iterations to ``queries``)."""
    if rescale:
        it = int(it / queries * 10000)
    for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
                           (200, 8), (50, 4), (10, 2)):
        if it > bound:
            return p_init / divisor
    return p_init


def _window(lo: torch.Tensor, size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, whether each of ``length`` positions is in ``[lo, lo + size)`` ``[B, length]``,
    and its offset in the window (clamped)."""
    offset = torch.arange(length, device=lo.device)[None, :] - lo[:, None]
    return (offset >= 0) & (offset < size), offset.clamp(0, size - 1)


@dataclass
class SquareResult:
    """What :meth:`Square.run` found: ``x_adv [B, C, H, W]`` (per example the first
    misclassified point, else the point of lowest loss), ``queries int64 [B]`` (scores spent per
    example, the initial point included) and ``success bool [B]`` (misclassified)."""

    x_adv: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor


@dataclass(frozen=True)
class Square:
    r"""Square Attack in 'Square Attack: a query-efficient black-box adversarial attack via random
    search' (Andriushchenko et al., ECCV 2020) [https://arxiv.org/abs/1912.00049], as AutoAttack
    runs it [https://github.com/fra31/auto-attack] (``SquareAttack``, ``resc_schedule=False``).

    Random search over squares: from a random point on the boundary of the ball (L-inf:
    vertical stripes of ``+-eps``; L2: a grid of ``eta`` profiles of random signs), each
    iteration changes one square window of side ``s`` (its area a fraction ``p`` of the image,
    ``p`` halving on a fixed schedule from ``p_init``) per example and keeps the change if it
    lowers the loss (the margin ``z_y - max_{j != y} z_j`` by default) or misclassifies. L-inf:
    the window is set to a vertex, ``+-eps`` per channel; L2: the window's mass is redrawn as
    ``eta`` of a random sign and a second window's moved into it, keeping the norm at ``eps``.

    Distance Measure : Linf, L2, L1 (L1: the reference's L1 Square, windows of ``eta`` profiles
    whose mass is moved within the L1 ball, projected onto the ball and the box)

    Arguments:
        norm (str): ``'linf'``, ``'l2'`` or ``'l1'``.
        eps (float): radius of the ball in [0, 1] pixel units.
        queries (int): score queries per example per restart, the initial point included.
            (Default: 5000, AutoAttack's)
        p_init (float): the initial fraction of pixels changed. (Default: 0.8, AutoAttack's)
        restarts (int): runs from new random points for the examples not yet misclassified.
            (Default: 1)
        loss (str): ``'margin'`` or ``'ce'`` (minus the cross-entropy). (Default: ``'margin'``)
        rescale_schedule (bool): stretch ``p``'s schedule from 10,000 iterations to ``queries``.
            (Default: False, as AutoAttack)

    Shape:
        - x: :math:`(B, C, H, W)` in [0, 1]; y: :math:`(B)` labels.
        - noise: :math:`(B)` int64 keys from :meth:`init_noise` (any leading dimensions, like x's).
        - output: :math:`(B, C, H, W)` in the ball and in [0, 1].

    Call: ``attack(forward, x, y, noise=noise) -> x_adv``, or :meth:`run` for the query counts
    with per-example ``eps`` and ``max_queries``.

    Examples::
        >>> attack = Square("linf", eps=8/255)
        >>> keys = attack.init_noise(x, torch.Generator().manual_seed(0))
        >>> result = attack.run(model, x, y, keys, max_queries=torch.full((len(x),), 1000))
        >>> result.x_adv, result.queries, result.success
    """

    norm: str
    eps: float
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    loss: str = "margin"
    rescale_schedule: bool = False

    def __post_init__(self) -> None:
        if self.norm not in SQUARE_NORMS:
            raise ConfigError(f"attack.norm={self.norm!r}; Square supports {', '.join(SQUARE_NORMS)}")
        if self.eps < 0:
            raise ConfigError(f"attack.eps={self.eps} must be >= 0")
        if self.queries < 1 or self.restarts < 1:
            raise ConfigError(f"queries={self.queries} and restarts={self.restarts} must be >= 1")
        if not 0 < self.p_init <= 1:
            raise ConfigError(f"p_init={self.p_init} must be in (0, 1]")
        if self.loss not in ("margin", "ce"):
            raise ConfigError(f"loss={self.loss!r}; Square takes 'margin' or 'ce'")

    def init_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One int64 key per example of ``x [..., C, H, W]``: shape ``x.shape[:-3]``."""
        return torch.randint(0, 2 ** 31 - 1, tuple(x.shape[:-3]), generator=generator, device=x.device)

    def scores(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The only access to the model: ``(margin [B], loss [B])`` at ``x`` from one forward
        pass without gradients; margin ``z_y - max_{j != y} z_j`` (> 0: correct), loss the
        quantity minimised (the margin, or minus the cross-entropy)."""
        with torch.no_grad():
            logits = forward(x).detach().float()
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
        margin = true - other
        if self.loss == "margin":
            return margin, margin
        return margin, -F.cross_entropy(logits, y, reduction="none")

    # -- random initial points -------------------------------------------------------------------
    def _init_linf(self, x: torch.Tensor, key: torch.Tensor, stream: int, eps) -> torch.Tensor:
        b, c, _, w = x.shape
        signs = _sign(uniform(key, stream, c * w)).to(x.dtype).view(b, c, 1, w)
        return (x + eps * signs).clamp(0, 1)

    def _init_lp(self, x: torch.Tensor, key: torch.Tensor, stream: int, eps) -> torch.Tensor:
        b, c, h, w = x.shape
        s = max(h // 5, 1)
        start = (h - s * 5) // 2
        corners = [(start + i * s, start + j * s) for i in range(h // s) for j in range(w // s)]
        profile = eta(s, self.norm).to(device=x.device, dtype=x.dtype)
        placed = torch.zeros(2, len(corners), h + start + s, w + start + s,
                             device=x.device, dtype=x.dtype)
        for n, (vh, vw) in enumerate(corners):  # tiles past the image edge are cut off, as in the reference
            placed[0, n, vh:vh + s, vw:vw + s] = profile
            placed[1, n, vh:vh + s, vw:vw + s] = profile.T
        placed = placed[..., :h, :w]
        u = uniform(key, stream, len(corners) * (c + 1)).to(x.dtype).view(b, len(corners), c + 1)
        flip = u[..., c] > 0.5  # [B, tiles]: the reference transposes eta at random
        tiles = torch.where(flip[..., None, None], placed[1][None], placed[0][None])  # [B, tiles, h, w]
        delta = torch.einsum("btc,bthw->bchw", _sign(u[..., :c]).to(x.dtype), tiles)
        if self.norm == "l1":
            return _project_l1(x, delta, eps)
        return (x + _normalize_l2(delta) * eps).clamp(0, 1)

    # -- one iteration ---------------------------------------------------------------------------
    def _propose_linf(self, x, x_best, key, counter, p, eps):
        b, c, h, w = x.shape
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
        u = uniform(key, counter, 2 + c)
        vh = (u[:, 0] * (h - s)).long()
        vw = (u[:, 1] * (w - s)).long()
        rows, _ = _window(vh, s, h)
        cols, _ = _window(vw, s, w)
        window = (rows[:, None, :, None] & cols[:, None, None, :]).to(x.dtype)
        signs = _sign(u[:, 2:]).to(x.dtype).view(b, c, 1, 1)
        x_new = x_best + window * 2 * eps * signs
        return torch.minimum(torch.maximum(x_new, x - eps), x + eps).clamp(0, 1)

    def _propose_lp(self, x, x_best, key, counter, p, eps):
        b, c, h, w = x.shape
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + 1 if s % 2 == 0 else s, h, w)
        u = uniform(key, counter, 5 + c)
        vh, vw = (u[:, 0] * (h - s)).long(), (u[:, 1] * (w - s)).long()
        vh2, vw2 = (u[:, 2] * (h - s)).long(), (u[:, 3] * (w - s)).long()
        rows1, off_r = _window(vh, s, h)
        cols1, off_c = _window(vw, s, w)
        rows2, _ = _window(vh2, s, h)
        cols2, _ = _window(vw2, s, w)
        mask1 = rows1[:, None, :, None] & cols1[:, None, None, :]  # [B, 1, h, w]
        mask2 = rows2[:, None, :, None] & cols2[:, None, None, :]
        profile = eta(s, self.norm).to(device=x.device, dtype=x.dtype)
        flip = u[:, 4] > 0.5
        placed = torch.where(flip[:, None, None], profile.T[off_r[:, :, None], off_c[:, None, :]],
                             profile[off_r[:, :, None], off_c[:, None, :]])[:, None] * mask1

        l1 = self.norm == "l1"

        def window_norm(t: torch.Tensor) -> torch.Tensor:  # per example and channel [B, C, 1, 1]
            if l1:
                return t.abs().sum(dim=(-2, -1), keepdim=True)
            return t.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()

        delta = x_best - x
        norm_image = threat.expand_per_sample(threat.lp_norm(delta, self.norm), x)
        norm_windows = window_norm(delta * (mask1 | mask2))
        old = delta * mask1 / (1e-12 + window_norm(delta * mask1))
        new = placed * _sign(u[:, 5:]).to(x.dtype).view(b, c, 1, 1) + old
        if l1:  # the reference's L1 rescaling: the room left in the ball, spread over the channels
            room = (torch.clamp_min(eps - norm_image, 0) / c + norm_windows) * c
        else:
            room = (torch.clamp_min(eps ** 2 - norm_image ** 2, 0) / c + norm_windows ** 2).sqrt()
        new = new / (1e-12 + window_norm(new)) * room
        delta = delta * ~mask1 * ~mask2 + new
        if l1:
            return _project_l1(x, delta, eps)
        return (x + _normalize_l2(delta) * eps).clamp(0, 1)

    # -- the steps the query-oracle version shares (metarobust.blackbox.square) -------------------
    def start(self, x: torch.Tensor, key: torch.Tensor, stream: int, eps) -> torch.Tensor:
        """The random initial point ``[B, C, H, W]`` of restart block ``stream``: L-inf vertical
        stripes of ``+-eps``, L2/L1 a grid of ``eta`` profiles of random signs; ``eps`` a float
        or per example ``[B, 1, 1, 1]``."""
        init = self._init_linf if self.norm == "linf" else self._init_lp
        return init(x, key, stream, eps)

    def propose(self, x: torch.Tensor, x_best: torch.Tensor, key: torch.Tensor, counter: int, p: float,
                eps) -> torch.Tensor:
        """The candidate ``[B, C, H, W]`` of one iteration from the current point ``x_best``: one
        square window of area fraction ``p`` changed per example (random numbers number
        ``counter`` of each key's stream), in the ball and the box."""
        propose = self._propose_linf if self.norm == "linf" else self._propose_lp
        return propose(x, x_best, key, counter, p, eps)

    # -- the attack ------------------------------------------------------------------------------
    def run(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, *,
            eps: threat.Budget | None = None, max_queries: int | torch.Tensor | None = None) -> SquareResult:
        """The attack with its accounting; ``eps`` (float or ``[B]``) and ``max_queries`` (int or
        int64 ``[B]``, capped at ``queries``) override the configured ones per example."""
        x = x.detach()
        if x.dim() != 4:
            raise ValueError(f"Square attacks images [B, C, H, W], got x of shape {tuple(x.shape)}")
        if noise is None or tuple(noise.shape) != tuple(x.shape[:1]):
            got = None if noise is None else tuple(noise.shape)
            raise ValueError(f"noise has shape {got}, expected {tuple(x.shape[:1])}: one key per example "
                             f"from attack.init_noise(x, generator)")
        radius = threat.per_sample(self.eps if eps is None else eps, x)
        budget = torch.full(y.shape, self.queries, device=x.device, dtype=torch.int64)
        if max_queries is not None:
            budget = torch.minimum(budget, torch.as_tensor(max_queries, device=x.device).to(torch.int64))
        spent = torch.zeros_like(budget)
        success = torch.zeros(y.shape, device=x.device, dtype=torch.bool)
        x_out = x
        for r in range(self.restarts):
            stream = r * (self.queries + 1)  # counter blocks: restart r draws from its own block
            x_best = self.start(x, noise, stream, radius)
            margin, loss = self.scores(forward, x_best, y)
            attacking = ~success & (budget > 0)
            queries = attacking.to(torch.int64)
            x_out = torch.where(threat.expand_per_sample(attacking, x), x_best, x_out)
            active = attacking & (margin > 0) & (queries < budget)
            for i in range(self.queries - 1):
                if i % CHECK_EVERY == 0 and _none_left(active):
                    break
                p = p_selection(self.p_init, i, self.queries, self.rescale_schedule)
                x_new = self.propose(x, x_best, noise, stream + 1 + i, p, radius)
                margin_new, loss_new = self.scores(forward, x_new, y)
                improved = active & (loss_new < loss)
                loss = torch.where(improved, loss_new, loss)
                keep = improved | (active & (margin_new <= 0))
                margin = torch.where(keep, margin_new, margin)
                x_best = torch.where(threat.expand_per_sample(keep, x), x_new, x_best)
                queries = queries + active.to(torch.int64)
                active = active & (margin > 0) & (queries < budget)
            won = attacking & (margin <= 0)
            x_out = torch.where(threat.expand_per_sample(attacking, x), x_best, x_out)
            spent = spent + queries
            success = success | won
        return SquareResult(x_out, spent, success)

    def __call__(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, loss: None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        if loss is not None:
            raise ValueError("Square takes its loss from the constructor (loss='margin' or 'ce')")
        return self.run(forward, x, y, noise).x_adv


def _normalize_l2(delta: torch.Tensor) -> torch.Tensor:
    return delta / (threat.expand_per_sample(threat.lp_norm(delta, "l2"), delta) + 1e-12)


def _project_l1(x: torch.Tensor, delta: torch.Tensor, eps) -> torch.Tensor:
    """``x + delta`` onto the L1 ball of radius ``eps (1 - 1e-6)`` around ``x`` intersected with
    the box (the reference's ``L1_projection``, which leaves a margin for its rounding)."""
    radius = eps.reshape(-1) if isinstance(eps, torch.Tensor) else eps
    return x + delta + l1_projection(x, delta, radius * (1.0 - 1e-6))


def _none_left(active: torch.Tensor) -> bool:
    """No example still running: a host sync every few iterations, never under ``vmap``."""
    return not inside_func_transform() and not bool(active.any())


@ATTACKS.register("square", "Square (Andriushchenko et al. 2020): score-based random search in linf/l2/l1, "
                            "5000 queries per example, p_init 0.8 (AutoAttack's); counts queries per example")
def _square(cfg: AttackConfig) -> Square:
    return Square(cfg.norm, cfg.eps, restarts=cfg.restarts)

"""SimBA and SimBA-DCT (Guo et al., ICML 2019), batched with per-example budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metarobust.blackbox.base import BLACKBOX_ATTACKS, Goal, QueryAttack, affordable, draw
from metarobust.blackbox.oracle import Oracle


def dct_matrix(n: int, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[n, n]``: row ``k`` is the ``k``-th cosine basis vector."""
    i = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (i.view(1, -1) + 0.5) * i.view(-1, 1) / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float().to(device)


def coordinate_order(shape: tuple[int, int, int], basis: str, freq_dims: int, stride: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The order SimBA tries coordinates in ``int64 [C*H*W]`` (flat indices of ``[C, H, W]``).

    Pixel basis: a random permutation. DCT basis: the reference's ``block_order``: first the
    ``freq_dims x freq_dims`` lowest frequencies of every channel in random order, then rings of
    width ``stride`` towards higher frequencies, each in random order.
    """
    c, h, w = shape
    n = c * h * w
    tie = draw(generator, (n,), torch.device("cpu"), kind="uniform")
    if basis == "pixel":
        return tie.argsort()
    u = torch.arange(h).view(1, -1, 1).expand(c, h, w)
    v = torch.arange(w).view(1, 1, -1).expand(c, h, w)
    reach = torch.maximum(u, v).flatten()
    ring = torch.where(reach < freq_dims, 0, (reach - freq_dims) // stride + 1)
    return (ring.float() + tie).argsort()


@dataclass(frozen=True)
class SimBA(QueryAttack):
    r"""SimBA in 'Simple Black-box Adversarial Attacks' (Guo, Gardner, You, Wilson & Weinberger,
    ICML 2019) [https://arxiv.org/abs/1905.07121] [https://github.com/cg563/simple-blackbox-attack].

    Distance Measure : L2 (the paper's; each accepted step adds ``step`` in L2) or Linf

    Coordinate by coordinate, in a random order of an orthonormal basis (pixels, or the 2-D DCT
    with low frequencies first), try ``-step`` then ``+step`` along the basis vector and keep the
    first that lowers the probability of the true class (targeted: raises the target's). One
    query per try: one or two per coordinate, plus the first query of the clean image (seeded:
    of ``x + init``, the point the search then starts from). The reference's code bounds nothing; here
    each point is projected onto the eps-ball and the box (L-inf pixel: the step is ``eps``,
    so a coordinate moves straight to the ball's face).

    Arguments:
        norm (str): ``"l2"`` or ``"linf"``.
        eps (float): radius of the ball.
        basis (str): ``"pixel"`` (SimBA) or ``"dct"`` (SimBA-DCT). (Default: ``"dct"``)
        step (float or None): the reference's ``epsilon``, the L2 length of a step; ``None``:
            0.2 (the paper's), or ``eps`` for the L-inf pixel basis.
        freq_dims (int or None): DCT: side of the low-frequency block tried first; ``None``: the
            image side / 8 rounded up (the paper's ImageNet 28 of 224). (Default: None)
        stride (int): DCT: width of each later ring of frequencies (the paper's 7).
        loss (str): the objective, ``"prob"`` (the true class's probability, the reference's).

    Examples::
        >>> outcome = SimBA("l2", eps=3.0)(oracle, x, y, generator)
    """

    norm: str = "l2"
    eps: float = 3.0
    basis: str = "dct"
    step: float | None = None
    freq_dims: int | None = None
    stride: int = 7
    loss: str = "prob"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.basis not in ("pixel", "dct"):
            raise ValueError(f"SimBA basis={self.basis!r}; choose 'pixel' or 'dct'")

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None):
        b, c, h, w = x.shape
        step = self.step if self.step is not None else (
            self.eps if (self.norm == "linf" and self.basis == "pixel") else 0.2)
        freq = self.freq_dims or math.ceil(h / 8)
        order = coordinate_order((c, h, w), self.basis, freq, self.stride, generator).to(x.device)
        dh, dw = dct_matrix(h, x.device), dct_matrix(w, x.device)
        every = torch.arange(b, device=x.device)

        delta = torch.zeros_like(x) if init is None else self.project(x, init)
        _, best, success = self.first_query(oracle, x, goal, delta)
        active = ~success
        for k in order.tolist():
            active = affordable(oracle, active, 1)
            if not active.any():
                break
            ch, rest = divmod(k, h * w)
            u, v = divmod(rest, w)
            direction = torch.zeros_like(x[0])
            if self.basis == "pixel":
                direction[ch, u, v] = 1.0
            else:  # the inverse DCT of a one-hot: an outer product of two cosine rows
                direction[ch] = torch.outer(dh[u], dw[v])
            for sign in (-1.0, 1.0):  # the reference tries the negative step first
                idx = every[active]
                if idx.numel() == 0:
                    break
                trial = self.project(x[idx], delta[idx] + sign * step * direction)
                points = self.snap(oracle, x[idx], trial)
                value, won = self.losses(oracle, points, idx, goal)
                better = value > best[idx]
                keep = idx[better]
                delta[keep] = trial[better]
                best[keep] = value[better]
                success[keep] = won[better]
                # an example that improved, or that cannot pay for the other sign, is done with k
                active = active.clone()
                active[keep] = False
                active = affordable(oracle, active, 1)
            active = ~success & affordable(oracle, torch.ones_like(active), 1)
        return self.snap(oracle, x, delta), success


@BLACKBOX_ATTACKS.register("simba", "SimBA (Guo et al. 2019): random pixel coordinates, +-step, "
                                    "1-2 queries each; L2 (paper) or Linf")
def _simba(norm: str, eps: float, **params) -> SimBA:
    return SimBA(norm, eps, basis="pixel", **params)


@BLACKBOX_ATTACKS.register("simba_dct", "SimBA-DCT (Guo et al. 2019): low-frequency DCT directions first, "
                                        "step 0.2; L2 (paper) or Linf")
def _simba_dct(norm: str, eps: float, **params) -> SimBA:
    return SimBA(norm, eps, basis="dct", **params)

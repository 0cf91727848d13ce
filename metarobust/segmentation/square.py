"""The Square attack on few-shot segmentation episodes (L-inf, score-based: no gradients).

The shared :class:`~metarobust.attacks.square.Square` searches for a point that lowers a
classification margin and stops an example once it is misclassified. A segmentation episode has
a label map, not a label, and no point at which it is "misclassified"; so :class:`EpisodeSquare`
replaces the only access to the model, :meth:`Square.scores`, with a per-episode objective to
raise, and never declares an episode broken: every episode spends its whole query budget and
keeps the best point found. All else (stripes start, square windows, the ``p`` schedule, the
counter-based per-episode random numbers) is the shared attack's.

An episode's images (``Q`` queries, or ``K`` supports, of ``C`` channels) are one image of
``Q * C`` channels to the search: a square window sits at one position in all of them, with an
independent sign per channel, as the reference moves the colour channels of one image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metarobust.attacks import threat
from metarobust.attacks.square import Square

Objective = Callable[[torch.Tensor], torch.Tensor]
"""``x [T, ...] -> [T]``: one number per episode, to raise."""


@dataclass(frozen=True)
class EpisodeSquare(Square):
    """:class:`Square` whose scores are an episode objective: ``forward`` returns ``[T]`` to
    raise (not logits), a candidate is kept only when it raises its episode's objective, and no
    episode stops before its budget is spent (the "margin" reported is always 1)."""

    def scores(self, forward: Objective, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            objective = forward(x).detach().float()
        return torch.ones_like(objective), -objective  # Square lowers its loss


def square_linf(objective: Objective, x: torch.Tensor, eps: float, queries: int = 1000, p_init: float = 0.05,
                generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Square Attack ('Square Attack: a query-efficient black-box adversarial attack via random
    search', Andriushchenko et al., ECCV 2020) [https://arxiv.org/abs/1912.00049] in L-inf on a
    batch of episodes, raising ``objective`` per episode.

    From vertical stripes of ``+-eps``, each query moves one square window of each episode to a
    vertex of the ball and keeps it only if the episode's objective rises; the window covers a
    fraction ``p`` of the pixels, ``p`` halving from ``p_init`` on the paper's schedule stretched
    from 10,000 iterations to ``queries`` (the paper's code; AutoAttack's p_init 0.8 schedule
    is not stretched). The clean input counts as a candidate: an episode whose search never beat
    it gets it back, so the returned objective is never below the clean one.

    Arguments:
        objective: ``x [T, ...] -> [T]``, e.g. the mean per-pixel cross-entropy of each episode.
        eps (float): L-inf radius in [0, 1] pixel units.
        queries (int): objective evaluations per episode, the stripes start included.
            (Default: 1000)
        p_init (float): the initial fraction of pixels in a window. (Default: 0.05, the paper's
            L-inf value)
        generator: draws one key per episode; the same keys, the same squares.

    Shape: ``x [T, ..., C, H, W]`` in [0, 1] (e.g. ``[T, Q, 1, H, W]``); returns ``x``'s shape,
    inside the eps-ball and [0, 1].

    Example:
        >>> adv = square_linf(lambda z: episode_loss(model(sx, sm, z), qm), qx, 0.035, queries=300)
    """
    x = x.detach()
    shape = x.shape
    flat = x.reshape(shape[0], -1, *shape[-2:])                           # [T, Q * C, H, W]
    attack = EpisodeSquare("linf", eps, queries=queries, p_init=p_init, rescale_schedule=True)
    keys = attack.init_noise(flat, generator)
    episodes = torch.zeros(shape[0], dtype=torch.long, device=x.device)   # no labels: scores ignore them
    adv = attack.run(lambda z: objective(z.view(shape)), flat, episodes, keys).x_adv.view(shape)
    with torch.no_grad():
        better = objective(adv) > objective(x)
    return torch.where(threat.expand_per_sample(better, x), adv, x)


__all__ = ["EpisodeSquare", "square_linf"]

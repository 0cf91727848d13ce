"""TRADES-regularised MAML: the TRADES baseline of R-MAML (Wang et al., ICLR 2021; META.md 2.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.meta.execution import Noise, TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.recipes.adversarial_querying import noise_of
from metarobust.training.recipes.base import MetaRecipe, Models, StepContext, register_recipe


@register_recipe("trades_maml", "TRADES-MAML (R-MAML's TRADES baseline): clean query CE + robust.weight x "
                                "KL(p_clean || p_adv) over support and query at the adapted weights")
class TRADESMAML(MetaRecipe):
    """Clean inner loop; meta-loss ``CE(query) + robust.weight x KL(p_clean || p_adv)`` at the
    adapted weights (:func:`~metarobust.training.objectives.trades_support_query`).

    ``robust.kl_batch`` chooses the KL term's points. ``task`` (default): task i's support and
    query. ``meta_batch``: every task's support and query, at task i's fast weights, each task
    attacking that whole batch from its own random start, as R-MAML's TRADES reference code
    does (noise ``meta_batch`` ``[T, T*N*(K+Q), ...]``; support then query, task by task).
    """

    noise = ("query", "support")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.whole = cfg.robust.kl_batch == "meta_batch"
        self._kl_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def noise_keys(self) -> tuple[str, ...]:
        return ("meta_batch",) if self.whole else self.noise

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        weight = self.cfg.robust.weight

        def task(params, sx, sy, qx, qy, noise):
            fast = maml.adapt(params, sx, sy)
            if self.whole:
                return objectives.trades_support_query(maml.forward, fast, sx, sy, qx, qy, attack,
                                                       noise_of(noise, "meta_batch"), weight, self._kl_batch)
            query, support = noise_of(noise, "query"), noise_of(noise, "support")
            both = None if query is None else torch.cat([support, query])
            return objectives.trades_support_query(maml.forward, fast, sx, sy, qx, qy, attack, both, weight)

        return task

    @staticmethod
    def meta_batch(batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's support, then every task's query: ``x [T*N*(K+Q), ...]`` and labels."""
        return (torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)]),
                torch.cat([batch.support_y.flatten(), batch.query_y.flatten()]))

    def draw_noise(self, batch: EpisodeBatch, generator: torch.Generator, rank: int = 0,
                   world_size: int = 1) -> Noise:
        if not self.whole:
            return super().draw_noise(batch, generator, rank, world_size)
        if world_size > 1:  # a rank holds only its slice of the meta-batch
            raise ConfigError("robust.kl_batch=meta_batch needs the whole meta-batch in one process; "
                              "run it without torchrun, or use robust.kl_batch=task")
        x = self.meta_batch(batch)[0]
        noise = self.train_attack().init_noise(x.unsqueeze(0).expand(batch.num_tasks, *x.shape), generator)
        return None if noise is None else {"meta_batch": noise}

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext):
        self._kl_batch = self.meta_batch(batch) if self.whole else None
        return super().loss(models, batch, ctx)

    def backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext):
        self._kl_batch = self.meta_batch(batch) if self.whole else None
        return super().backward(models, batch, ctx)


__all__ = ["TRADESMAML"]

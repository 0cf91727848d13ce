"""ITS-MAML (Duan et al., "Rethinking the Number of Shots in Robust Model-Agnostic Meta-Learning",
arXiv 2211.15180), reconstructed from the paper's description (``shared/methods/META.md``
2.4, tagged [R]): R-MAML_out meta-trained with more shots than it is tested with."""

from __future__ import annotations

from metarobust.config import ExperimentConfig
from metarobust.errors import ConfigError
from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.r_maml import RMAML


@register_recipe("its_maml", "ITS-MAML (Duan et al. 2022, reconstructed): R-MAML_out meta-trained with more shots "
                             "than tested (meta.train_shots > meta.test_shots) and fewer inner steps")
class ITSMAML(RMAML):
    """:class:`RMAML` whose configs train with ``meta.train_shots > meta.test_shots``."""

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        super().config_check(cfg)
        m = cfg.meta
        if m.train_shots <= m.test_shots:
            raise ConfigError(
                f"recipe=its_maml trains with more shots than it tests, but meta.train_shots={m.train_shots} "
                f"<= meta.test_shots={m.test_shots}; raise meta.train_shots (e.g. {m.test_shots + 4}) "
                f"or use recipe=r_maml for equal shots")


__all__ = ["ITSMAML"]

"""ANIL (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML", ICLR 2020, arXiv 1909.09157)."""

from __future__ import annotations

from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.maml import MAMLRecipe


@register_recipe("anil", "ANIL (Raghu et al. 2020): MAML adapting only the head in the inner loop "
                         "(meta.adapt=head), clean query CE")
class ANIL(MAMLRecipe):
    """MAML whose inner loop (training and fine-tuning at test) adapts only the classifier head;
    the body is learned by the outer loop alone."""

    adapt = "head"


__all__ = ["ANIL"]

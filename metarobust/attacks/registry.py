"""The attack registry: config name -> factory ``f(cfg: AttackConfig) -> attack``.

Each attack module registers its own entries, so adding an attack touches one file.
"""

from metarobust.registry import Registry

ATTACKS = Registry("attack")

"""Defenses: training losses usable in any training loop, registered by name.

``DEFENSES.create("pgd-at", eps=0.3)``; third-party packages add theirs through the
``robustbench_lite.defenses`` entry-point group. ``robustbench-lite train`` is one loop that uses them.
"""
from robustbench_lite.plugins import Registry

from .adversarial import PGDAT
from .augmix import AugMix
from .base import Defense, add_option
from .certified import IBPTraining
from .group_dro import GroupDRO
from .rst import RST
from .standard import Standard
from .trades import TRADES
from .wrm import WRM

DEFENSES: Registry[Defense] = Registry("defense", "robustbench_lite.defenses")
DEFENSES.register("standard", Standard)
DEFENSES.register("pgd-at", PGDAT)
DEFENSES.register("trades", TRADES)
DEFENSES.register("augmix", AugMix)
DEFENSES.register("wrm", WRM)
DEFENSES.register("group-dro", GroupDRO)
DEFENSES.register("ibp", IBPTraining)
DEFENSES.register("rst", RST)

__all__ = ["DEFENSES", "Defense", "PGDAT", "Standard", "add_option"]
__all__ += ["AugMix", "GroupDRO", "IBPTraining", "RST", "TRADES", "WRM"]

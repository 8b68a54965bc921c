"""Defenses: training losses usable in any training loop, registered by name.

``DEFENSES.create("pgd-at", eps=0.3)``; third-party packages add theirs through the
``robustbench_lite.defenses`` entry-point group. ``robustbench-lite train`` is one loop that uses them.
"""
from robustbench_lite.registry import Registry

from .adversarial import PGDAT
from .base import Defense, add_option
from .standard import Standard

DEFENSES: Registry[Defense] = Registry("defense", "robustbench_lite.defenses")
DEFENSES.register("standard", Standard)
DEFENSES.register("pgd-at", PGDAT)
# issue 5: TRADES, AugMix, WRM, group DRO, IBP certified training
from .augmix import AugMix  # noqa: E402
from .certified import IBPTraining  # noqa: E402
from .group_dro import GroupDRO  # noqa: E402
from .trades import TRADES  # noqa: E402
from .wrm import WRM  # noqa: E402

for _cls in (TRADES, AugMix, WRM, GroupDRO, IBPTraining):
    DEFENSES.register(_cls.name, _cls)

__all__ = ["DEFENSES", "Defense", "PGDAT", "Standard", "add_option"]
__all__ += ["AugMix", "GroupDRO", "IBPTraining", "TRADES", "WRM"]

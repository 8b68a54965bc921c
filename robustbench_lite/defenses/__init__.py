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
__all__ = ["DEFENSES", "Defense", "PGDAT", "Standard", "add_option"]

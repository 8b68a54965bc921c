"""Attacks: every attack implements the contract of :mod:`attacks.base` and is registered by name.

Find one with ``attacks.ATTACKS.create("pgd", steps=100)``; third-party packages add theirs through
the ``robustbench_lite.attacks`` entry-point group.
"""
from robustbench_lite.registry import Registry

from .base import Attack, AttackResult, PassCounter, QueryOracle, frozen, margin_loss
from .pgd import PGD

ATTACKS: Registry[Attack] = Registry("attack", "robustbench_lite.attacks")
ATTACKS.register("pgd", PGD)

__all__ = ["ATTACKS", "Attack", "AttackResult", "PGD", "PassCounter", "QueryOracle", "frozen", "margin_loss"]

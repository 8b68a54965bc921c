"""Attacks: every attack implements the contract of :mod:`attacks.base` and is registered by name.

Find one with ``attacks.ATTACKS.create("pgd", steps=100)``; third-party packages add theirs through
the ``robustbench_lite.attacks`` entry-point group.
"""
from robustbench_lite.plugins import Registry

from .base import Attack, AttackResult, PassCounter, QueryOracle, frozen, margin_loss
from .pgd import PGD
from .apgd import APGD, APGDT
from .ensemble import AutoAttack, AutoAttackFMN, AutoAttackRef
from .fab import FAB, FABT
from .fgsm import FGSM
from .fmn import FMN, FMNT
from .hsja import HopSkipJump
from .square import Square
from .transfer import Transfer

ATTACKS: Registry[Attack] = Registry("attack", "robustbench_lite.attacks")
ATTACKS.register("pgd", PGD)
ATTACKS.register("fgsm", FGSM)
ATTACKS.register("apgd", APGD)
ATTACKS.register("apgd-ce", APGD)
ATTACKS.register("apgd-t", APGDT)
ATTACKS.register("fmn", FMN)
ATTACKS.register("fmn-t", FMNT)
ATTACKS.register("fab", FAB)
ATTACKS.register("fab-t", FABT)
ATTACKS.register("autoattack", AutoAttack)
ATTACKS.register("autoattack-fmn", AutoAttackFMN)
ATTACKS.register("autoattack-ref", AutoAttackRef)
ATTACKS.register("square", Square)
ATTACKS.register("hsja", HopSkipJump)
ATTACKS.register("transfer", Transfer)

__all__ = ["ATTACKS", "APGD", "APGDT", "Attack", "AttackResult", "AutoAttack", "AutoAttackFMN", "AutoAttackRef", "FAB",
           "FABT", "FGSM", "FMN", "FMNT", "HopSkipJump", "PGD", "PassCounter", "QueryOracle", "Square", "Transfer", "frozen", "margin_loss"]

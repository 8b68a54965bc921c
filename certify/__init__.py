"""Certifiers: every certifier implements the contract of :mod:`certify.base` and is registered by name.

Find one with ``certify.CERTIFIERS.create("crown")``; third-party packages add theirs through the
``robustbench_lite.certifiers`` entry-point group. The bound propagators (IBP, CROWN, alpha-CROWN)
share one graph walk, :mod:`certify.graph`; LP, SDP and the exact MIP share the dense lowering
and per-example loop of :mod:`certify.convex`. Every certified verdict is sound under floating-point
rounding by one rule, :mod:`certify.rounding` (docs/soundness.md).
"""
from robustbench_lite.plugins import Registry

from .bab import BaB
from .base import CertResult, Certifier, margins_certified, spec_matrix
from .crown import CROWN, AlphaCROWN, intermediate_bounds
from .ibp import IBP
from .lp import LP
from .mip import MIP
from .sdp import SDP
from .sdp_fo import SDPFO

CERTIFIERS: Registry[Certifier] = Registry("certifier", "robustbench_lite.certifiers")
CERTIFIERS.register("ibp", IBP)
CERTIFIERS.register("crown", CROWN)
CERTIFIERS.register("alpha-crown", AlphaCROWN)
CERTIFIERS.register("lp", LP)
CERTIFIERS.register("mip", MIP)
CERTIFIERS.register("sdp", SDP)
CERTIFIERS.register("sdp-fo", SDPFO)
CERTIFIERS.register("bab", BaB)

__all__ = ["CERTIFIERS", "AlphaCROWN", "BaB", "CROWN", "CertResult", "Certifier", "IBP", "LP", "MIP", "SDP", "SDPFO",
           "intermediate_bounds", "margins_certified", "spec_matrix"]

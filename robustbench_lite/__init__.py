"""robustbench-lite: attack, certify, train and rank image classifiers for adversarial robustness."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import RobustBenchLiteError, UserInputError  # noqa: E402
from .threat import ThreatModel  # noqa: E402

_LAZY = {
    "evaluate": ("robustbench_lite.evaluation.core", "evaluate"),
    "EvaluationResult": ("robustbench_lite.evaluation.core", "EvaluationResult"),
    "load_dataset": ("robustbench_lite.data", "load_dataset"),
    "load_model": ("robustbench_lite.zoo", "load_model"),
}


def __getattr__(name: str):
    # torch-heavy modules load on first use, so `import robustbench_lite` stays cheap for the CLI
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'robustbench_lite' has no attribute {name!r}")


__all__ = ["RobustBenchLiteError", "ThreatModel", "UserInputError", "__version__", *_LAZY]

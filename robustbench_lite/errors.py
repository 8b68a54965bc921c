"""Exceptions that robustbench-lite raises on purpose.

Every user-facing error is a :class:`RobustBenchLiteError`; the CLI prints its message as one
line on stderr and exits non-zero, without a traceback. Anything else escaping is a bug.
"""
from __future__ import annotations


class RobustBenchLiteError(Exception):
    """Base class of every error the project raises for a reason the user can act on."""

    exit_code = 2


class UserInputError(RobustBenchLiteError, ValueError):
    """Bad argument: unknown name, eps out of range, wrong shape, input outside the box."""


class CheckpointError(RobustBenchLiteError):
    """Missing, corrupt, tampered or mismatched model weights."""


class CorruptFileError(RobustBenchLiteError):
    """An existing result file that cannot be read; it is reported, never overwritten."""


class DatasetNotFoundError(RobustBenchLiteError):
    """Dataset files are not where they should be and downloading was not requested."""


class SoundnessError(RobustBenchLiteError):
    """certified <= robust <= correct failed for some example: a certifier or attack is wrong."""

    exit_code = 3


class NonFiniteOutputError(RobustBenchLiteError):
    """The model produced NaN or infinite logits."""


class UnsupportedModelError(UserInputError):
    """A certifier cannot handle the model; ``layers`` names every unsupported piece (``"name (what)"``).

    The message is one line, ``unsupported layers: a (X), b (Y)...``; the evaluator reads a default
    certifier's examples as skipped with it, and raises it for a certifier the user named.
    """

    def __init__(self, layers: list[str] | str, hint: str = "", subject: str = "") -> None:
        """``layers``: the unsupported pieces, or a reason already written (``unsupported layers: ...``)."""
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.reason = layers if isinstance(layers, str) else "unsupported layers: " + ", ".join(self.layers)
        super().__init__((f"{subject}: " if subject else "") + self.reason + (f"; {hint}" if hint else ""))

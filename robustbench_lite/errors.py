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

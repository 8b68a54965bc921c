"""Exceptions that robustbench-lite raises on purpose.

Every user-facing error is a :class:`RobustBenchLiteError`; the CLI prints its message as one
line on stderr and exits non-zero, without a traceback. Anything else escaping is a bug.
"""
from __future__ import annotations

import math
import operator
from typing import Any


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


# --- argument checks that raise the errors above ---------------------------------------------------
#: the largest float32: a hyper-parameter above it overflows inside the tensors it scales
FLOAT32_MAX = 3.4028234663852886e38


def checked_number(name: str, value: Any, *, minimum: float | None = None, above: float | None = None,
                   maximum: float | None = None) -> float:
    """``value`` as a float, finite in float32 and in range, else a UserInputError naming ``name``.

    >>> checked_number("lr", 0.1, above=0)
    0.1
    """
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserInputError(f"{name} must be a number, got {short_repr(value)}") from None
    bounds = " and ".join(b for b in (f">= {minimum:g}" if minimum is not None else "",
                                      f"> {above:g}" if above is not None else "",
                                      f"<= {maximum:g}" if maximum is not None else "") if b)
    if not math.isfinite(number):
        raise UserInputError(f"{name} must be finite{' and ' + bounds if bounds else ''}, got {short_repr(value)}")
    if abs(number) > FLOAT32_MAX:
        raise UserInputError(f"{name} {number:g} overflows float32 (at most {FLOAT32_MAX:.3g} in size)")
    if not ((minimum is None or number >= minimum) and (above is None or number > above)
            and (maximum is None or number <= maximum)):
        raise UserInputError(f"{name} must be {bounds}, got {short_repr(value)}")
    return number


def checked_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (an integer type, not a float or a bool) in range, else a UserInputError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise UserInputError(f"{name} must be an integer, got {short_repr(value)}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        wanted = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                          f"<= {maximum}" if maximum is not None else "") if b)
        raise UserInputError(f"{name} must be {wanted}, got {short_repr(value)}")
    return number


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name (for one-line errors)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

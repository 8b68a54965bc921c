"""Shared pieces of the fuzz tests (test_fuzz_*.py): hostile values, the in-process CLI, the guarantee.

The guarantee (README, "Errors"): every command ends with exit 0, or with exactly one line
``robustbench-lite: error: ...`` on stderr and exit 2 (1 when the operating system refused: an
unwritable folder, a full disk), never a traceback; a command that fails writes no file and no
command modifies a good file it was not asked to write.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import re
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from robustbench_lite import cli

ERROR_PREFIX = "robustbench-lite: error: "
#: what a command may print on stderr besides its error line: regenerate's announcements, -v log lines
PROGRESS = re.compile(r"^(\[rank \d+\] evaluating |robustbench-lite: (INFO|WARNING): )")

#: (examples, marks): a bounded, derandomized run in the default suite; a random, deeper one behind `slow`
QUICK, DEEP = 12, 300


def depths(quick: int = QUICK, deep: int = DEEP) -> list:
    return [pytest.param(quick, id="quick"), pytest.param(deep, id="deep", marks=pytest.mark.slow)]


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= QUICK * 4,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# --- hostile values -------------------------------------------------------------------------------
def _float_text(x: float) -> str:
    return repr(x) if math.isfinite(x) else {math.inf: "inf", -math.inf: "-inf"}.get(x, "nan")


#: numbers as a user could type them: ints, floats, huge, tiny, negative, NaN, inf, fractions, junk
_SPECIAL_NUMBERS = st.sampled_from([
                     "0", "-0", "1e39", "-1e39", "1e308", "1e-320", "5e-324", "nan", "NaN", "inf", "-inf", "Infinity",
                     "2**70", "1_000", "0x10", "1e", ".", "-", "+", "", " ", "1 2", "½", "٣", "1,5", "8/255", "8/0",
                     "0/0", "8/", "/255", "1/2/3", "nan/1", "1/inf", "inf/inf", "1e39/1", "-8/255", "8/-255",
                     "3.5", "１", "0.3\x00", "0.3\n", "--1", "1e-8", "255", "256/255", "1.0000001", "3e38",
                     "3.5e38", "1e38", "1e-45", "9" * 30, "-9" * 30, str(2**63), str(2**64), str(-2**63 - 1), "0.0"])
NUMBER_TEXT = st.one_of(
    _SPECIAL_NUMBERS, _SPECIAL_NUMBERS, _SPECIAL_NUMBERS,
    st.integers(-10, 10).map(str),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(_float_text),
    st.builds(lambda a, b: f"{a}/{b}", st.integers(-300, 300), st.integers(-300, 300)),
    st.text(max_size=8),
)

#: names: unknown, empty, unicode, path-like, option-like
NAME_TEXT = st.one_of(
    st.sampled_from(["", " ", "none", "None", "NONE", ",", ",,", "-", "--x", "../../etc/passwd", "/", ".", "..",
                     "a/b", "C:\\x", "~", "$HOME", "é", "\u202e", "\x00", "名前", "x" * 300, "a:b", ":", "os:",
                     ":f", "1", "-1", "nan", "pgd,", ",pgd", "pgd pgd", "PGD", " ibp ", "ibp;crown"]),
    st.text(max_size=12),
)


# --- running the CLI in this process ----------------------------------------------------------------
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``robustbench-lite argv`` run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_clean_outcome(code: int, out: str, err: str, allowed: tuple[int, ...] = (0, 2)) -> None:
    """Exit 0, or one ``robustbench-lite: error:`` line and a non-zero exit; never a traceback."""
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code in allowed, (code, err)
    lines = [line for line in err.strip().splitlines() if not PROGRESS.match(line)]
    if code != 0:
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
        assert len(lines[0]) > len(ERROR_PREFIX) + 3, err
    else:
        assert not lines, err


def snapshot(*roots: Path, resume_state: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``roots`` (path -> digest), without the resume state an evaluation or a
    training stopped by an error keeps on purpose: ``.state/`` folders, and ``NAME.<kind>.safetensors``
    for each kind in ``resume_state`` (train's ``ckpt`` and ``best``)."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []:
            if not path.is_file() or "__pycache__" in path.parts or ".state" in path.parts:
                continue
            if any(path.name.endswith(f".{kind}.safetensors") for kind in resume_state):
                continue
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_nothing_written_on_error(code: int, before: dict[str, str], after: dict[str, str]) -> None:
    """A failed command leaves every file as it found it and adds none."""
    if code != 0:
        assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                                 if before.get(k) != after.get(k)}


def checked_run(argv: list[str], roots: list[Path], allowed: tuple[int, ...] = (0, 2),
                protected: Callable[[str], bool] = lambda path: False,
                resume_state: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Run ``argv``; check the one-outcome guarantee, no file touched on error and ``protected`` files kept."""
    before = snapshot(*roots, resume_state=resume_state)
    code, out, err = run_cli(argv)
    after = snapshot(*roots, resume_state=resume_state)
    assert_one_clean_outcome(code, out, err, allowed)
    assert_nothing_written_on_error(code, before, after)
    for path, digest in before.items():
        if protected(path):
            assert after.get(path) == digest, f"{path} was modified by {argv}"
    return code, out, err


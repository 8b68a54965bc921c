"""The one atomic writer: a write stopped at any step leaves the old file or the new one, never a partial one."""
from __future__ import annotations

import os
import stat
import tempfile

import pytest

from robustbench_lite import atomic
from robustbench_lite.atomic import atomic_write, atomic_write_bytes, atomic_write_text

OLD, NEW = b"old record\n" * 1000, b"new record, longer than the old one\n" * 1000

# Every step of a write, as (function of the os / tempfile modules, which of its calls fails).
# The first os.open is mkstemp's, the second the folder's. The folder fsync comes after the rename:
# an interruption there already finds the new file in place.
STEPS = [("mkstemp", 1), ("write", 1), ("fsync", 1), ("chmod", 1), ("replace", 1), ("open", 2), ("fsync", 2)]


def failing_at(monkeypatch, name: str, nth: int, error: BaseException) -> list[str]:
    """Make the ``nth`` call of ``name`` raise ``error``; returns the log of the calls seen."""
    calls: list[str] = []
    module = tempfile if name == "mkstemp" else os
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        if calls.count(name) == nth:
            raise error
        return original(*args, **kwargs)

    if name != "write":
        monkeypatch.setattr(module, name, wrapper)
    return calls


def writer(calls: list[str], fail_mid_write: BaseException | None):
    """Write NEW in two halves; with ``fail_mid_write``, raise after the first half is on disk."""
    def write(fh):
        fh.write(NEW[: len(NEW) // 2])
        fh.flush()
        calls.append("write")
        if fail_mid_write is not None:
            raise fail_mid_write
        fh.write(NEW[len(NEW) // 2:])
    return write


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
@pytest.mark.parametrize("existing", [True, False], ids=["over-a-file", "new-file"])
@pytest.mark.parametrize("step", STEPS, ids=[f"{n}#{k}" for n, k in STEPS])
def test_a_write_interrupted_at_any_step_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch, step, existing,
                                                                           error):
    path = tmp_path / "board" / "record.json"
    if existing:
        path.parent.mkdir()
        path.write_bytes(OLD)
    name, nth = step
    calls = failing_at(monkeypatch, name, nth, error)
    folder_step = (name, nth) in (("open", 2), ("fsync", 2))
    if folder_step and isinstance(error, OSError):  # a folder that cannot be synced does not fail the write
        atomic_write(path, writer(calls, None))
    else:
        with pytest.raises(type(error)):
            atomic_write(path, writer(calls, error if name == "write" else None))
    monkeypatch.undo()
    assert name in calls  # the step was reached
    after = path.read_bytes() if path.exists() else None
    assert after in ((OLD if existing else None), NEW)  # never a partial file
    assert after == (NEW if folder_step else (OLD if existing else None))
    assert [p.name for p in path.parent.iterdir()] == ([path.name] if after is not None else [])  # no leftovers


def test_the_content_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    seen: list[tuple[str, bool]] = []
    target = tmp_path / "f.bin"
    for name in ("fsync", "replace"):
        original = getattr(os, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            fd_or_src = args[0]
            is_folder = _name == "fsync" and stat.S_ISDIR(os.fstat(fd_or_src).st_mode)
            seen.append((_name, is_folder))
            return _original(*args, **kwargs)
        monkeypatch.setattr(os, name, spy)
    atomic_write_bytes(target, b"x")
    monkeypatch.undo()
    assert seen == [("fsync", False), ("replace", False), ("fsync", True)]


def test_permissions_are_kept_and_a_new_file_is_readable(tmp_path):
    new = atomic_write_text(tmp_path / "sub" / "new.txt", "héllo")
    assert new.read_text("utf-8") == "héllo" and stat.S_IMODE(new.stat().st_mode) == 0o644
    old = tmp_path / "old.txt"
    old.write_text("a")
    old.chmod(0o600)
    atomic_write_text(old, "b")
    assert old.read_text() == "b" and stat.S_IMODE(old.stat().st_mode) == 0o600


def test_every_writer_of_the_package_goes_through_the_one_helper():
    """No module but atomic.py renames files into place or opens files for writing by hand."""
    import pathlib
    import re

    root = pathlib.Path(atomic.__file__).resolve().parents[1]
    offenders = []
    for folder in ("robustbench_lite", "attacks", "certify"):
        for py in (root / folder).rglob("*.py"):
            if py.name == "atomic.py":
                continue
            text = py.read_text("utf-8")
            if re.search(r"os\.replace|os\.rename|mkstemp|NamedTemporaryFile|save_file\(|\.write_(text|bytes)\(|"
                         r"open\([^)]*['\"][wax]b?['\"]", text):
                offenders.append(str(py.relative_to(root)))
    assert offenders == []

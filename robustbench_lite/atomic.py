"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every file the project writes (leaderboard records, rendered pages and plots, resume shards, model
cards, zoo weights, training checkpoints, the parsed-data cache) goes through :func:`atomic_write`:
the content goes to a temporary file in the target's folder (``.<name>.<random>.partial``), which is
flushed, fsynced and given the target's permissions, then ``os.replace`` swaps it in (atomic on
POSIX and Windows within one file system) and the folder is fsynced where the platform allows it, so
the rename survives a power cut. Any exception on the way, KeyboardInterrupt included, removes the
temporary file and leaves the target as it was.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

PARTIAL_SUFFIX = ".partial"
_NEW_FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a temporary binary file next to ``path``, then swap it in; returns ``path``.

    The folder is created if missing. An existing target keeps its permission bits; a new one is 0o644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_of(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # already renamed, or never created
            pass
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _mode_of(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return _NEW_FILE_MODE


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable: fsync the folder's entry table (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows, or a folder we may not open
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems that refuse fsync on a folder
        pass
    finally:
        os.close(fd)

"""Parse once, then load fast: an .npz cache of parsed arrays, keyed by what they were built from.

The key is a string the caller builds from the source file's sha256 and the version of every rule
that shaped the arrays (parser, split rule, scikit-learn's version), so a changed source or rule is
never served stale. Each cache file stores its key and a sha256 of its own arrays; a file that
cannot be read, or whose key or digest does not match, is logged and rebuilt, never trusted.
Files are written atomically (:mod:`robustbench_lite.atomic`) and read with ``allow_pickle=False``.
Within a process, arrays are also kept in memory (read-only) after the first load.

Location: ``$RBL_CACHE_DIR``, else ``$XDG_CACHE_HOME/robustbench-lite``, else
``~/.cache/robustbench-lite``. An unwritable location only costs speed (a warning is logged).
"""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_write
from ..hashing import arrays_sha256

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_MEMORY: dict[Path, Arrays] = {}


def cache_dir() -> Path:
    """Directory of the parsed-array cache (created on first write)."""
    if os.environ.get("RBL_CACHE_DIR"):
        return Path(os.environ["RBL_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "robustbench-lite"


def _cache_path(name: str, key: str) -> Path:
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _read(path: Path, key: str) -> Arrays | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored_key, digest = str(z["__key__"]), str(z["__digest__"])
            arrays = {k: z[k] for k in z.files if not k.startswith("__")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("parsed-data cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if stored_key != key or arrays_sha256(arrays) != digest:
        log.warning("parsed-data cache %s does not match its source or its own digest; rebuilding it", path)
        return None
    return arrays


def _write(path: Path, key: str, arrays: Arrays) -> None:
    try:
        atomic_write(path, lambda f: np.savez(f, __key__=np.array(key), __digest__=np.array(arrays_sha256(arrays)),
                                              **arrays))
    except OSError as exc:
        log.warning("could not write parsed-data cache %s (%s); loading will parse the source again", path, exc)


def cached_arrays(name: str, key: str, build: Callable[[], Arrays]) -> Arrays:
    """``build()``'s arrays, from memory, from the cache file for ``key``, or built and cached.

    The returned arrays are read-only and shared between callers: copy before changing them.
    """
    path = _cache_path(name, key)
    arrays = _MEMORY.get(path)
    if arrays is not None:
        return arrays
    arrays = _read(path, key)
    if arrays is None:
        arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
        _write(path, key, arrays)
        log.info("parsed %s and cached it at %s", name, path)
    for a in arrays.values():
        a.setflags(write=False)
    _MEMORY[path] = arrays
    return arrays


def clear_memory() -> None:
    """Forget the in-process copies (the next load reads the cache file again)."""
    _MEMORY.clear()

"""Results of slow, deterministic planning kept on disk, so a new process does not pay for them again.

Choosing how to tile a VAE pass replays the VAE's code on the meta device for several candidate grids (memory peaks
and FLOPs). At Wan's real size that took about 3 s of CPU before the first tiled decode of a process on the H200
machine, and as much before the first tiled start-frame encode (issue 10: 6.6 s against 3.3 s for the untiled
decode). The answers depend only on the model's config, the shapes and the code that replays them, so they are
kept per machine, as Triton keeps its compiled kernels: in ``$VIDEO_OFFLOAD_CACHE_DIR`` (``off`` turns it off), else
``plans/`` in the pack's cache folder (:func:`cache_home`: ``$XDG_CACHE_HOME/video-offload`` or
``~/.cache/video-offload``). Each file is named by a fingerprint of the code
and library versions that produced it, so a changed planner never reads an old answer. A file that cannot be read
or written is ignored: the value is computed as if there were no cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "VIDEO_OFFLOAD_CACHE_DIR"


def cache_home() -> Path:
    """The pack's folder for what it keeps between runs on this machine: ``$XDG_CACHE_HOME/video-offload``, else
    ``~/.cache/video-offload``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "video-offload"


def default_cache_dir() -> Path | None:
    """Where plans are kept on this machine, or None when ``$VIDEO_OFFLOAD_CACHE_DIR`` is ``off``."""
    chosen = os.environ.get(ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen)
    return cache_home() / "plans"


def fingerprint(*parts: str | bytes) -> str:
    """A short digest of what an answer depends on besides its arguments (source files, library versions)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _key(args: tuple) -> str:
    """A stable text key for hashable arguments (classes by their qualified name)."""
    def plain(value: Any) -> Any:
        if isinstance(value, type):
            return f"{value.__module__}.{value.__qualname__}"
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(args), sort_keys=True, default=str)


def _restore(value: Any) -> Any:
    """JSON keeps tuples as lists: give tuples back (the cached functions return ints and tuples of ints)."""
    return tuple(_restore(v) for v in value) if isinstance(value, list) else value


class PlanCache:
    """One JSON file per (namespace, fingerprint) in ``directory``; ``directory=None`` keeps nothing."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self._loaded: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()
        """Planning may run in a background thread beside the caller's (``core.background``): one reads or writes
        the entries at a time, so a file is never written from a dictionary that another thread is changing."""

    def _file(self, namespace: str, version: str) -> Path:
        return self.directory / f"{namespace}-{version}.json"

    def _entries(self, path: Path) -> dict[str, Any]:
        if path not in self._loaded:
            try:
                self._loaded[path] = json.loads(path.read_text())
            except (OSError, ValueError):
                self._loaded[path] = {}
        return self._loaded[path]

    def _lookup(self, path: Path, key: str) -> tuple[bool, Any]:
        with self._lock:
            entries = self._entries(path)
            return (True, entries[key]) if key in entries else (False, None)

    def _store(self, path: Path, key: str, value: Any) -> None:
        with self._lock:
            entries = self._entries(path)
            entries[key] = value
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f)
                os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
            except OSError as e:
                log.debug("plan cache %s not written: %s", path, e)

    def memoize(self, namespace: str, version: str) -> Callable[[Callable], Callable]:
        """Decorator: the function's value for given (hashable, JSON-able) arguments is read from disk when a
        process with the same ``version`` computed it before."""
        def decorate(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def wrapper(*args):
                if self.directory is None:
                    return fn(*args)
                path, key = self._file(namespace, version), _key(args)
                found, value = self._lookup(path, key)
                if found:
                    return _restore(value)
                value = fn(*args)
                self._store(path, key, value)
                return value

            return wrapper

        return decorate

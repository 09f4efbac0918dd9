"""The pack's error types.

Every message says what failed, where, and how to fix it, because the person reading it is usually looking at a
red node in ComfyUI, not at a stack trace. Engine code raises these ``from`` the original exception so the
cause is still there for a bug report.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_ECHO_CHARS = 120
"""How much of a bad value an error message repeats. A value comes from a user, a workflow or an HTTP request
(ComfyUI accepts 100 MB bodies): echoing all of it would make the message as large as the attack."""

_echo_repr = reprlib.Repr()
_echo_repr.maxstring = _echo_repr.maxother = MAX_ECHO_CHARS
_echo_repr.maxlist = _echo_repr.maxtuple = _echo_repr.maxdict = _echo_repr.maxset = 8
_echo_repr.maxlevel = 3


def echo(value: Any) -> str:
    """``repr(value)`` bounded to about ``MAX_ECHO_CHARS`` characters, saying how long a long text was.

    Short values read exactly as ``repr`` writes them. Long texts keep their start and say their length
    (``'aaaa...' (1000000 characters)``); containers are summarised by ``reprlib`` without walking them whole.
    """
    if isinstance(value, (str, bytes)):
        if len(value) <= MAX_ECHO_CHARS:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:MAX_ECHO_CHARS - 20]!r}... ({len(value)} {unit})"
    try:
        text = _echo_repr.repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not replace the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 2 * MAX_ECHO_CHARS else text[: 2 * MAX_ECHO_CHARS] + "..."


class VideoOffloadError(Exception):
    """Base class for every error this pack raises on purpose."""


class ConfigError(VideoOffloadError, ValueError):
    """A setting or generation parameter is invalid. Raised before any heavy work starts."""

    def __init__(self, field: str, value: Any, problem: str, fix: str):
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}={echo(value)}: {problem}. Fix: {fix}")

    def renamed(self, field: str) -> ConfigError:
        """The same error under the name the user sees (a node's widget name rather than the engine's)."""
        return ConfigError(field, self.value, self.problem, self.fix)


class ModelLoadError(VideoOffloadError):
    """A model folder is missing, incomplete, corrupt or in a format the pack refuses to load."""


class VideoSaveError(VideoOffloadError):
    """Writing the video failed (disk full, permissions). ``frames`` keeps the generated frames, so nothing is
    lost: save them again elsewhere."""

    frames = None


class OffloadOutOfMemoryError(VideoOffloadError):
    """A stage ran out of accelerator memory. Names the stage, what was free, and the next option to turn on."""

    def __init__(self, stage: str, free_bytes: int | None, total_bytes: int | None, advice: str):
        self.stage = stage
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes
        self.advice = advice
        if free_bytes is None or total_bytes is None:
            where = "device memory"
        else:
            where = f"{format_bytes(free_bytes)} free of {format_bytes(total_bytes)}"
        super().__init__(f"Out of memory during {stage} ({where}). {advice}")


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


class WorkerError(VideoOffloadError):
    """A distributed worker failed. Carries the rank and the worker's own traceback."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str | None = None):
        self.rank = rank
        self.remote_traceback = remote_traceback
        text = message if rank is None else f"rank {rank}: {message}"
        if remote_traceback:
            text += f"\n--- worker traceback ---\n{remote_traceback}"
        super().__init__(text)

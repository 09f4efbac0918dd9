"""The pack's error types.

Every message says what failed, where, and how to fix it, because the person reading it is usually looking at a
red node in ComfyUI, not at a stack trace. Engine code raises these ``from`` the original exception so the
cause is still there for a bug report.
"""

from __future__ import annotations

from typing import Any


class VideoOffloadError(Exception):
    """Base class for every error this pack raises on purpose."""


class ConfigError(VideoOffloadError, ValueError):
    """A setting or generation parameter is invalid. Raised before any heavy work starts."""

    def __init__(self, field: str, value: Any, problem: str, fix: str):
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}={value!r}: {problem}. Fix: {fix}")

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

"""Checks of the nodes' own widget values, shared by ``VALIDATE_INPUTS`` and the nodes' functions.

ComfyUI validates a whole graph before it runs any node: min/max and choices, then each node's
``VALIDATE_INPUTS`` with that node's widget values (linked inputs arrive as None; the graph itself is not visible
there). A bad ``filename_prefix`` or a frame count that is not 4k+1 is therefore reported, together with every
other bad value of the graph, before minutes of sampling - instead of by the node that needs it, one at a time.
The node functions run the same checks again (workflows reach them through the HTTP API too).

Note ComfyUI's rule: an input listed in ``VALIDATE_INPUTS``'s arguments skips ComfyUI's own min/max check, so the
checks here include the bounds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..offload.config import SamplingParams
from ..offload.errors import ConfigError

MAX_PREFIX_CHARS = 200
"""Longest filename_prefix (file systems allow 255 bytes per name; the counter and extension need room)."""
PIXEL_MULTIPLE = 16
"""Wan2.1's width/height multiple (VAE 8 x patch 2), the Sample widgets' step. The model's own geometry is checked
again when Sample runs (a model with another multiple says so there)."""
TEMPORAL_FACTOR = 4


def problems(*checks: Any) -> list[str]:
    """Run each zero-argument check; collect the messages of those that raise ``ConfigError``."""
    found = []
    for check in checks:
        try:
            check()
        except ConfigError as e:
            found.append(str(e))
    return found


def report(found: list[str]) -> bool | str:
    """What ``VALIDATE_INPUTS`` returns: True, or every problem in one message."""
    return True if not found else " | ".join(found)


def check_sampling_widgets(width: Any = None, height: Any = None, num_frames: Any = None, cfg: Any = None,
                           flow_shift: Any = None) -> list[str]:
    """Every bad Sample widget value among those given (None: linked or not given, checked when the node runs)."""
    def size(name: str, value: Any, default: int) -> None:
        SamplingParams(**{name: value})  # type and bounds
        if value % PIXEL_MULTIPLE:
            lower = value // PIXEL_MULTIPLE * PIXEL_MULTIPLE or PIXEL_MULTIPLE
            raise ConfigError(name, value, f"must be a multiple of {PIXEL_MULTIPLE}", f"use {lower} or {lower + PIXEL_MULTIPLE}")

    def frames() -> None:
        SamplingParams(num_frames=num_frames)
        if num_frames % TEMPORAL_FACTOR != 1:
            lower = (num_frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
            raise ConfigError("num_frames", num_frames, f"must be of the form {TEMPORAL_FACTOR}k+1",
                              f"use {lower} or {lower + TEMPORAL_FACTOR}")

    def finite(name: str, value: Any, low: float, high: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(name, value, f"must be a finite number from {low} to {high}", "use the widget's default")

    checks = []
    if width is not None:
        checks.append(lambda: size("width", width, 832))
    if height is not None:
        checks.append(lambda: size("height", height, 480))
    if num_frames is not None:
        checks.append(frames)
    if cfg is not None:
        checks.append(lambda: finite("cfg", cfg, 0.0, 100.0))
    if flow_shift is not None:
        checks.append(lambda: finite("flow_shift", flow_shift, 0.0, 100.0))
    return problems(*checks)


def check_filename_prefix(prefix: Any, root: Path) -> Path:
    """The file path (without counter and extension) ``prefix`` names inside the output folder ``root``; refuses
    what cannot be a file name there."""
    fix = "use a relative name such as video_offload/wan"
    if not isinstance(prefix, str):
        raise ConfigError("filename_prefix", prefix, "must be text", fix)
    if not prefix.strip():
        raise ConfigError("filename_prefix", prefix, "is empty", fix)
    if "\0" in prefix:
        raise ConfigError("filename_prefix", prefix, "contains a NUL character", fix)
    if len(prefix) > MAX_PREFIX_CHARS:
        raise ConfigError("filename_prefix", prefix, f"is longer than {MAX_PREFIX_CHARS} characters", fix)
    root = root.resolve()
    target = (root / prefix).resolve()
    if target == root or prefix.rstrip().endswith(("/", "\\")) or target.name in ("", ".", ".."):
        raise ConfigError("filename_prefix", prefix, "names a folder, not a file name", fix)
    if root not in target.parents:
        raise ConfigError("filename_prefix", prefix, "leads outside the output folder", fix)
    for folder in reversed(target.parents):
        if folder == root or root not in folder.parents:
            continue
        if folder.exists() and not folder.is_dir():
            raise ConfigError("filename_prefix", prefix, f"passes through {folder.relative_to(root)}, which is a file",
                              "choose another prefix, or move that file")
    return target

"""The compute device a user names (``--device``, ``device=``), checked once, before anything is loaded.

``torch.device("foo")`` raises a RuntimeError listing every backend torch knows, and ``cuda`` on a machine without
CUDA fails later, deep inside the first copy. Both are input mistakes, so they get a ``ConfigError`` that names
the value and the fix, at construction of the manager.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

SUPPORTED = ("cpu", "cuda")
FIX = "use cuda, cuda:<index> or cpu"


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: Any) -> torch.device:
    """``device`` (None: CUDA when available, else the CPU) as a ``torch.device`` this machine has."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise ConfigError("device", device, "is not a device name", FIX)
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError("device", device, "is not a device name", FIX) from e
    if parsed.type not in SUPPORTED:
        raise ConfigError("device", device, f"is a {parsed.type} device, which this pack does not run on", FIX)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = parsed.index if parsed.index is not None else 0
        if index >= count:
            have = f"this machine has {count} CUDA device{'s' if count != 1 else ''}"
            fix = "use cpu (no CUDA device is available)" if count == 0 else f"use cuda:0 to cuda:{count - 1}"
            raise ConfigError("device", device, f"is not available ({have})", fix)
        if parsed.index is None:
            parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed

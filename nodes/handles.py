"""What flows between the pack's nodes. Frozen: a node never changes what it was given, it returns a new one."""

from __future__ import annotations

from dataclasses import dataclass

from ..offload.config import OffloadConfig
from ..offload.manager import LoadedWan, OffloadManager

MODEL_TYPE = "VO_MODEL"
CONDITIONING_TYPE = "VO_CONDITIONING"


@dataclass(frozen=True)
class ModelHandle:
    """A loaded Wan model, the manager that places it, and the offload options to place it with."""

    manager: OffloadManager
    model: LoadedWan
    config: OffloadConfig

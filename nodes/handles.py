"""What flows between the pack's nodes. Frozen: a node never changes what it was given, it returns a new one."""

from __future__ import annotations

from dataclasses import dataclass

from ..offload.config import OffloadConfig
from ..offload.core.loaded_model import LoadedModel
from ..offload.core.manager import OffloadManager

MODEL_TYPE = "VO_MODEL"
CONDITIONING_TYPE = "VO_CONDITIONING"


@dataclass(frozen=True)
class ModelHandle:
    """A loaded model, the manager that places it, and the offload options to place it with."""

    manager: OffloadManager
    model: LoadedModel
    config: OffloadConfig

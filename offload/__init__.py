"""The Video Offload engine. Never imports ComfyUI: usable as a plain library, from the CLI, and by the nodes."""

from .config import OffloadConfig, SamplingParams
from .errors import (
    ConfigError,
    ModelLoadError,
    OffloadOutOfMemoryError,
    VideoOffloadError,
    VideoSaveError,
    WorkerError,
)
from .generator import VideoGenerator
from .manager import OffloadManager

__all__ = [
    "ConfigError",
    "ModelLoadError",
    "OffloadConfig",
    "OffloadManager",
    "OffloadOutOfMemoryError",
    "SamplingParams",
    "VideoGenerator",
    "VideoOffloadError",
    "VideoSaveError",
    "WorkerError",
]

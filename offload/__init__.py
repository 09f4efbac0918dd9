"""The Video Offload engine. Never imports ComfyUI: usable as a plain library, from the CLI, and by the nodes.

Layers, each importing only those below it:

- ``config``, ``errors``, ``dtypes``: the options (declared once), the error hierarchy, the dtype names.
- ``core/``: model-agnostic - host memory, placement, layerwise streaming, the offload manager, the denoising loop,
  and the spec a model family fills in (``core/spec.py``).
- ``weights/``: the one safetensors reader, dtype rules, and the format adapters (Diffusers folders).
- ``distributed/``: the generic torchrun worker group (one ``call`` primitive) and FSDP/CFG/Ulysses pieces.
- ``families/``: one folder per model family (``wan/``), registered by what ``model_index.json`` says.
- ``pipeline/``: the generation stages, ``VideoGenerator``, the CLI, video files.
"""

from .config import OffloadConfig, Precision, SamplingParams
from .core.manager import OffloadManager
from .errors import (
    ConfigError,
    ModelLoadError,
    OffloadOutOfMemoryError,
    VideoOffloadError,
    VideoSaveError,
    WorkerError,
)
from .pipeline.generator import VideoGenerator

__all__ = [
    "ConfigError",
    "ModelLoadError",
    "OffloadConfig",
    "OffloadManager",
    "OffloadOutOfMemoryError",
    "Precision",
    "SamplingParams",
    "VideoGenerator",
    "VideoOffloadError",
    "VideoSaveError",
    "WorkerError",
]

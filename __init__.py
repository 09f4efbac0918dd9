"""Video Offload: run Wan2.1 video diffusion transformers on GPUs too small to hold them, inside ComfyUI or not."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .offload import OffloadConfig, VideoGenerator

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "OffloadConfig", "VideoGenerator"]

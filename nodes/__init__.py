"""ComfyUI nodes: thin wrappers that turn widget values into engine calls (V1 node API)."""

from .generation import EncodePrompt, Sample
from .loaders import LoadModel, OffloadSettings
from .video import DecodeVAE, SaveVideo

NODE_CLASS_MAPPINGS = {
    "VideoOffloadLoadModel": LoadModel,
    "VideoOffloadSettings": OffloadSettings,
    "VideoOffloadEncodePrompt": EncodePrompt,
    "VideoOffloadSample": Sample,
    "VideoOffloadDecodeVAE": DecodeVAE,
    "VideoOffloadSaveVideo": SaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoOffloadLoadModel": "Load Wan Model (Video Offload)",
    "VideoOffloadSettings": "Offload Settings (Video Offload)",
    "VideoOffloadEncodePrompt": "Encode Prompt (Video Offload)",
    "VideoOffloadSample": "Sample (Video Offload)",
    "VideoOffloadDecodeVAE": "Decode VAE (Video Offload)",
    "VideoOffloadSaveVideo": "Save Video MP4 (Video Offload)",
}

"""ComfyUI nodes: thin wrappers that turn widget values into engine calls (V1 node API)."""

from .generation import EncodePrompt, Sample
from .loras import LoadLoRA
from .loaders import LoadDiT, LoadImageEncoder, LoadModel, LoadTextEncoder, LoadVAE, OffloadSettings, WanModelFromFiles
from .video import DecodeVAE, SaveVideo

NODE_CLASS_MAPPINGS = {
    "VideoOffloadLoadDiT": LoadDiT,
    "VideoOffloadLoadTextEncoder": LoadTextEncoder,
    "VideoOffloadLoadVAE": LoadVAE,
    "VideoOffloadLoadCLIPVision": LoadImageEncoder,
    "VideoOffloadWanModel": WanModelFromFiles,
    "VideoOffloadLoadModel": LoadModel,
    "VideoOffloadSettings": OffloadSettings,
    "VideoOffloadLoadLoRA": LoadLoRA,
    "VideoOffloadEncodePrompt": EncodePrompt,
    "VideoOffloadSample": Sample,
    "VideoOffloadDecodeVAE": DecodeVAE,
    "VideoOffloadSaveVideo": SaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoOffloadLoadDiT": "Load Wan DiT (Video Offload)",
    "VideoOffloadLoadTextEncoder": "Load Text Encoder (Video Offload)",
    "VideoOffloadLoadVAE": "Load VAE (Video Offload)",
    "VideoOffloadLoadCLIPVision": "Load CLIP Vision (Video Offload)",
    "VideoOffloadWanModel": "Wan Model from Files (Video Offload)",
    "VideoOffloadLoadModel": "Load Wan Diffusers Folder (Video Offload)",
    "VideoOffloadSettings": "Offload Settings (Video Offload)",
    "VideoOffloadLoadLoRA": "Load LoRA (Video Offload)",
    "VideoOffloadEncodePrompt": "Encode Prompt (Video Offload)",
    "VideoOffloadSample": "Sample (Video Offload)",
    "VideoOffloadDecodeVAE": "Decode VAE (Video Offload)",
    "VideoOffloadSaveVideo": "Save Video MP4 (Video Offload)",
}

"""Decode VAE and Save Video: latents to frames, frames to an .mp4 in ComfyUI's output folder."""

from __future__ import annotations

from ..offload.errors import ConfigError
from ..offload.pipeline.stages import decode_video
from ..offload.pipeline.video_io import save_mp4
from ._host import output_directory
from .handles import MODEL_TYPE, ModelHandle
from .latents import from_comfy_latent

CATEGORY = "Video Offload"


class DecodeVAE:
    """Frames as a ComfyUI IMAGE batch [F, H, W, 3], so ComfyUI's own video nodes take them too."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "The model whose VAE decodes (placed per vae_cpu_offload)."}),
                "latent": ("LATENT", {"tooltip": "From Sample (or any LATENT of this model, such as a KSampler's)."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decode a LATENT to frames with the model's VAE, placed per vae_cpu_offload."

    def decode(self, model: ModelHandle, latent):
        return (decode_video(model.manager, model.model, model.config, from_comfy_latent(model.model, latent)),)


class SaveVideo:
    """Writes an H.264 .mp4 into ComfyUI's output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames from Decode VAE (or any IMAGE batch)."}),
                "fps": ("INT", {"default": 16, "min": 1, "max": 240, "tooltip": "Wan2.1 is trained at 16 fps."}),
                "filename_prefix": ("STRING", {"default": "video_offload/wan", "tooltip":
                    "File name prefix inside the output folder; a counter is appended."}),
            }
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Write frames as an H.264 .mp4 into ComfyUI's output folder."

    def save(self, images, fps, filename_prefix):
        root = output_directory().resolve()
        target = (root / filename_prefix).resolve()
        if root not in target.parents:
            raise ConfigError("filename_prefix", filename_prefix, "leads outside the output folder",
                              "use a relative name such as video_offload/wan")
        target.parent.mkdir(parents=True, exist_ok=True)
        counter = 1 + sum(1 for _ in target.parent.glob(f"{target.name}_*.mp4"))
        path = target.parent / f"{target.name}_{counter:05d}.mp4"
        while path.exists():
            counter += 1
            path = target.parent / f"{target.name}_{counter:05d}.mp4"
        save_mp4(images, path, fps=fps)
        subfolder = path.parent.relative_to(root).as_posix()
        return {"ui": {"images": [{"filename": path.name, "subfolder": "" if subfolder == "." else subfolder,
                                   "type": "output"}], "animated": (True,)}}

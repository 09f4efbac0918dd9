"""Decode VAE and Save Video: latents to frames, frames to an .mp4 in ComfyUI's output folder."""

from __future__ import annotations

import json

import torch

from ..offload.errors import ConfigError, VideoSaveError
from ..offload.pipeline.stages import decode_video
from ..offload.pipeline.video_io import save_mp4, validate_fps
from ._host import metadata_disabled, output_directory
from .validation import check_filename_prefix, problems, report
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
    """Writes an H.264 .mp4 of IMAGE frames into ComfyUI's output folder, with the graph in its metadata."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames from Decode VAE (or any IMAGE batch)."}),
                "fps": ("INT", {"default": 16, "min": 1, "max": 240, "tooltip": "Wan2.1 is trained at 16 fps."}),
                "filename_prefix": ("STRING", {"default": "video_offload/wan", "tooltip":
                    "File name prefix inside the output folder; a counter is appended, so no video is overwritten."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Write IMAGE frames as an H.264 .mp4 into ComfyUI's output folder, with the workflow in its metadata (drop "
        "the video on the canvas to get the graph back). Takes frames, unlike ComfyUI's Save Video, which takes a "
        "VIDEO."
    )

    @classmethod
    def VALIDATE_INPUTS(cls, fps, filename_prefix):
        """Before the graph runs: the prefix (and fps, whose bounds ComfyUI skips once it is listed here)."""
        return report(problems(
            lambda: validate_fps(fps) if fps is not None else None,
            lambda: check_filename_prefix(filename_prefix, output_directory()) if filename_prefix is not None else None,
        ))

    def save(self, images, fps, filename_prefix, prompt=None, extra_pnginfo=None):
        root = output_directory().resolve()
        target = check_filename_prefix(filename_prefix, root)
        check_frames(images)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VideoSaveError(f"Cannot create the folder {target.parent} for the video ({e}). Fix: choose another "
                                 "filename_prefix, then queue the graph again (the frames are cached).") from e
        path = save_mp4(images, target.with_name(target.name + ".mp4"), fps=fps,
                        metadata=comfy_metadata(prompt, extra_pnginfo), numbered=True)
        subfolder = path.parent.relative_to(root).as_posix()
        return {"ui": {"images": [{"filename": path.name, "subfolder": "" if subfolder == "." else subfolder,
                                   "type": "output"}], "animated": (True,)}}


def check_frames(images) -> None:
    """An IMAGE batch of frames ``[F, H, W, 3]`` (before ffmpeg is started)."""
    shape = tuple(getattr(images, "shape", ())) or None
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[:3]) < 1:
        raise ConfigError("images", shape, "must be [frames, height, width, 3] with at least one frame",
                          "connect Decode VAE's images (or another IMAGE batch)")


def comfy_metadata(prompt, extra_pnginfo) -> dict[str, str] | None:
    """ComfyUI's SaveVideo metadata: each ``extra_pnginfo`` entry (the frontend sends ``{"workflow": graph}``) and the
    API ``prompt``, as JSON text - unless ComfyUI runs with ``--disable-metadata``."""
    if metadata_disabled():
        return None
    metadata = {}
    if isinstance(extra_pnginfo, dict):
        metadata.update({str(key): json.dumps(value) for key, value in extra_pnginfo.items()})
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    return metadata or None

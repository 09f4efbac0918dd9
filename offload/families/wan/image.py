"""Image-to-video conditioning, built the way diffusers' ``WanImageToVideoPipeline`` builds it.

Two signals come from the start image: CLIP features (penultimate hidden states of the image encoder), which
the DiT cross-attends to, and the VAE latents of a video whose first frame is the image and whose other frames
are zero, concatenated to the noisy latents with a mask that marks the first frame as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import SamplingParams
from ...core.spec import LatentSpace
from ...errors import ConfigError


def to_pil(image: Any, field: str = "image"):
    """Accept a PIL image, a file path, an ``[H, W, 3]`` array in 0..1 or 0..255, or a ComfyUI IMAGE tensor
    ``[1, H, W, 3]`` (0..1); return an RGB PIL image."""
    import PIL.Image

    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with PIL.Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as e:
            raise ConfigError(field, str(image), f"could not be read as an image ({e})", "pass a PNG or JPEG file") from e
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(array.shape[:2]) < 1:
            raise ConfigError(field, array.shape, "is not an [H, W, 3] image", "pass one RGB image")
        if not np.isfinite(array).all():
            raise ConfigError(field, "array with NaN/inf", "has non-finite pixels", "pass a valid image")
        if array.dtype != np.uint8:
            scale = 255.0 if array.max() <= 1.0 else 1.0
            array = (np.clip(array * scale, 0, 255)).round().astype(np.uint8)
        return PIL.Image.fromarray(array[..., :3], "RGB")
    raise ConfigError(field, type(image).__name__, "is not an image", "pass a PIL image, a file path or an array")


@torch.no_grad()
def encode_image_embeds(image_processor: Any, image_encoder: torch.nn.Module, image, device: torch.device) -> torch.Tensor:
    """CLIP features of the start image: the encoder's penultimate hidden states, ``[1, tokens, dim]``."""
    dtype = next(image_encoder.parameters()).dtype
    pixel_values = image_processor(images=image, return_tensors="pt").pixel_values.to(device, dtype)
    return image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def image_condition_latents(
    vae: torch.nn.Module, image, params: SamplingParams, space: LatentSpace, device: torch.device
) -> torch.Tensor:
    """``[1, t + channels, T, h, w]`` float32: the first-frame mask and the normalised VAE latents of the image video."""
    from diffusers.video_processor import VideoProcessor

    height, width, num_frames = params.height, params.width, params.num_frames
    temporal, spatial = space.temporal_factor, space.spatial_factor
    pixels = VideoProcessor(vae_scale_factor=spatial).preprocess(image, height=height, width=width)
    pixels = pixels.to(device, dtype=torch.float32).unsqueeze(2)
    video = torch.cat([pixels, pixels.new_zeros(1, pixels.shape[1], num_frames - 1, height, width)], dim=2)
    dtype = next(vae.parameters()).dtype
    latent = vae.encode(video.to(dtype)).latent_dist.mode().to(torch.float32)
    latent = space.from_raw(latent)

    latent_h, latent_w = height // spatial, width // spatial
    mask = torch.ones(1, 1, num_frames, latent_h, latent_w)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal, latent_h, latent_w).transpose(1, 2).to(latent.device)
    return torch.cat([mask, latent], dim=1).cpu()

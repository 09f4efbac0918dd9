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


MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest start image (64 megapixels; an 8K frame is 33). It is resized to the video's size anyway."""
MAX_ASPECT_RATIO = 8.0
"""Widest (or tallest) start image. CLIP preprocessing scales the shortest side up to 224 pixels, so a 1x10000
strip would become 224x2,240,000 floats (GBs) from a 126-byte PNG; no video has such a shape."""


def check_image_size(width: int, height: int, field: str = "image") -> None:
    """Refuse an empty image, one over ``MAX_IMAGE_PIXELS``, or one more elongated than ``MAX_ASPECT_RATIO``,
    before any pixel is decoded or resized."""
    size = f"{width}x{height}"
    if width < 1 or height < 1:
        raise ConfigError(field, size, "is an empty image", "pass an image with at least one pixel")
    if width * height > MAX_IMAGE_PIXELS:
        raise ConfigError(field, size, f"has more than {MAX_IMAGE_PIXELS // 2**20} megapixels",
                          "resize the start image to about the video's size (e.g. 832x480)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ConfigError(field, size, f"is more elongated than {MAX_ASPECT_RATIO:g}:1",
                          "crop the start image to the video's aspect ratio (e.g. 832x480)")


def to_pil(image: Any, field: str = "image"):
    """Accept a PIL image, a file path, an ``[H, W, 3]`` array or a ComfyUI IMAGE tensor ``[1, H, W, 3]``; return
    an RGB PIL image.

    Float arrays and tensors are 0..1 (ComfyUI's IMAGE): values are clipped to that range, never rescaled by
    guessing from their maximum - a bicubic upscale overshoots 1.0 slightly, and must not turn the frame black.
    Integer arrays are 0..255. Sizes are checked (:func:`check_image_size`) before anything is decoded.
    """
    import PIL.Image

    if isinstance(image, PIL.Image.Image):
        check_image_size(*image.size, field=field)
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        return _open_image_file(image, field)
    if isinstance(image, torch.Tensor):
        if image.dtype.is_complex or not (image.dtype.is_floating_point or image.dtype == torch.uint8):
            raise ConfigError(field, f"tensor of {image.dtype}", "is not an image tensor",
                              "pass a float IMAGE in 0..1 (as ComfyUI's Load Image gives)")
        image = image.detach().cpu().float().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, field)
    raise ConfigError(field, type(image).__name__, "is not an image", "pass a PIL image, a file path or an array")


def _open_image_file(path: str | Path, field: str):
    import PIL.Image

    try:
        with PIL.Image.open(path) as opened:  # reads the header only: the size is known before decoding
            check_image_size(*opened.size, field=field)
            return opened.convert("RGB")
    except PIL.Image.DecompressionBombError as e:
        raise ConfigError(field, str(path), "is too large to decode safely (PIL's decompression-bomb limit)",
                          "resize the start image to about the video's size") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ConfigError(field, str(path), f"could not be read as an image ({str(e)[:200]})",
                          "pass a PNG or JPEG file") from e


def _array_to_pil(array: np.ndarray, field: str):
    import PIL.Image

    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ConfigError(field, array.shape, "is not an [H, W, 3] image", "pass one RGB image")
    check_image_size(array.shape[1], array.shape[0], field=field)
    if array.dtype.kind not in "uif":  # bool, complex, object, strings...
        raise ConfigError(field, f"array of {array.dtype}", "is not an image array",
                          "pass floats in 0..1 or integers in 0..255")
    if array.dtype != np.uint8:
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise ConfigError(field, "array with NaN/inf", "has non-finite pixels", "pass a valid image")
            array = np.clip(array, 0.0, 1.0) * 255.0  # 0..1 by definition: clip, never guess the scale
        array = np.clip(array, 0, 255).round().astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")


@torch.no_grad()
def encode_image_embeds(image_processor: Any, image_encoder: torch.nn.Module, image, device: torch.device) -> torch.Tensor:
    """CLIP features of the start image: the encoder's penultimate hidden states, ``[1, tokens, dim]``."""
    dtype = next(image_encoder.parameters()).dtype
    pixel_values = image_processor(images=image, return_tensors="pt").pixel_values.to(device, dtype)
    return image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def image_condition_latents(
    vae: torch.nn.Module, image, params: SamplingParams, space: LatentSpace, device: torch.device,
    tiling: str = "off", available_bytes: int | None = None,
) -> torch.Tensor:
    """``[1, t + channels, T, h, w]`` float32: the first-frame mask and the normalised VAE latents of the image video.
    With ``tiling`` the video (the image, then zeros) stays in host memory and is encoded in exact spatial tiles."""
    from diffusers.video_processor import VideoProcessor

    from .tiling_policy import encode_grid

    height, width, num_frames = params.height, params.width, params.num_frames
    temporal, spatial = space.temporal_factor, space.spatial_factor
    pixels = VideoProcessor(vae_scale_factor=spatial).preprocess(image, height=height, width=width)
    pixels = pixels.to(dtype=torch.float32).unsqueeze(2)
    video = torch.cat([pixels, pixels.new_zeros(1, pixels.shape[1], num_frames - 1, height, width)], dim=2)
    dtype = next(vae.parameters()).dtype
    tiles = encode_grid(vae, tuple(video.shape), tiling, available_bytes)
    if tiles is None:
        latent = vae.encode(video.to(device, dtype)).latent_dist.mode().to(torch.float32)
    else:
        from .vae_tiling import encode_tiled

        latent = encode_tiled(vae, video.to(dtype), tiles.grid, device=device,
                              frame_split=tiles.frame_split).mode().to(torch.float32)
    latent = space.from_raw(latent)

    latent_h, latent_w = height // spatial, width // spatial
    mask = torch.ones(1, 1, num_frames, latent_h, latent_w)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal, latent_h, latent_w).transpose(1, 2).to(latent.device)
    return torch.cat([mask, latent], dim=1).cpu()

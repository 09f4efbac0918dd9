"""Latents -> frames with the Wan VAE, as diffusers' ``WanPipeline`` decodes them."""

from __future__ import annotations

import torch

from ...core.spec import LatentSpace


@torch.no_grad()
def decode_latents(
    vae: torch.nn.Module, latents: torch.Tensor, space: LatentSpace, device: torch.device, tiling: str = "off",
    available_bytes: int | None = None,
) -> torch.Tensor:
    """Decode ``[1, C, T, h, w]`` normalised latents; return frames ``[F, H, W, 3]`` as float32 in 0..1 on the CPU.

    The latents are de-normalised with the VAE's own ``latents_mean``/``latents_std`` first (Wan's latent space is
    standardised per channel), written exactly as diffusers writes it so the result matches bit for bit. With
    ``tiling`` (``tiling_policy``) the decode runs in exact spatial tiles and assembles the video in host memory.
    """
    from .tiling_policy import decode_grid
    from .vae_tiling import decode_tiled, video_to_frames

    dtype = next(vae.parameters()).dtype
    raw = space.to_raw(latents.to(device=device, dtype=dtype))
    tiles = decode_grid(vae, tuple(raw.shape), tiling, available_bytes)
    if tiles is None:
        # [1, 3, F, H, W] in -1..1 -> [F, H, W, 3] in 0..1, the layout ComfyUI's IMAGE uses
        return video_to_frames(vae.decode(raw, return_dict=False)[0])[0].cpu().contiguous()
    # the tiles are made into frames on the device and assembled in host memory while the next ones decode
    return decode_tiled(vae, raw, tiles.grid, output_device="cpu", store_device="cpu", frame_split=tiles.frame_split,
                        frames=True)[0]

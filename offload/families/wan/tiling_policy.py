"""When the Wan VAE tiles (``vae_tiling``), and into how many tiles: decided from free memory, per call.

``off``: diffusers' own untiled pass. ``auto``: untiled while the estimate of the untiled pass fits in what the
device has free, else the cheapest grid that fits. ``on``: the cheapest grid that fits (at least two tiles).
Estimates come from ``vae_tiling``'s meta-device replay of the same code (tensor storage only), with an allowance
for what a GPU adds (cuDNN workspaces, the caching allocator's rounding). Tiled decodes assemble the video in host
memory. A device too small even for the finest grid is an out-of-memory error, which carries the usual advice.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

GPU_ALLOWANCE = 1.15
"""Measured GPU peak / estimated tensor storage (the untiled decode: 9.26 GiB measured for 8.09 estimated)."""
UNTILED_ENCODE_ALLOWANCE = 1.75
"""The same ratio for diffusers' untiled *encode*, which the replay underestimates more: 7.27 GiB measured at
480x832x81 on an H200 for 4.19 GiB estimated (tiled encodes keep to ``GPU_ALLOWANCE``: 2.20 GiB for 1.94 at 2x2).
Without it ``auto`` kept a 6 GiB card's start-frame encode untiled and ran out of memory (issue 10's I2V row)."""
ON_BUDGET = 2 * 2**30
"""Activation budget when tiling is forced on and free memory is unknown (a CPU run, a test)."""


def _budget(mode: str, available: int | None, weights: int) -> int | None:
    if available is None:
        return ON_BUDGET if mode == "on" else None
    return max(int(available / GPU_ALLOWANCE) - weights, 0)


def _at_least_two(grid: tuple[int, int]) -> tuple[int, int]:
    return grid if grid != (1, 1) else (1, 2)


def decode_grid(vae, latent_shape: tuple[int, ...], mode: str, available: int | None) -> tuple[int, int] | None:
    """The decode's tile grid, or None for diffusers' untiled decode."""
    from .vae_tiling import choose_decode_grid, estimate_decode_memory

    if mode == "off":
        return None
    budget = _budget(mode, available, 0)
    if budget is None:
        return None
    if mode == "auto" and estimate_decode_memory(vae, latent_shape, (1, 1)).peak <= budget:
        return None
    try:
        grid = choose_decode_grid(vae, latent_shape, budget, output_on_device=False, store_on_device=False)
    except MemoryError as e:
        raise torch.OutOfMemoryError(f"VAE decode: even the finest tiling needs more than {budget} bytes") from e
    grid = _at_least_two(grid) if mode == "on" else grid
    logger.info("VAE decode of %s latents in %dx%d tiles (vae_tiling=%s, %s bytes free)", tuple(latent_shape), *grid,
                mode, available)
    return grid


def encode_grid(vae, video_shape: tuple[int, ...], mode: str, available: int | None) -> tuple[int, int] | None:
    """The encode's tile grid (the image-to-video start-frame video), or None for diffusers' untiled encode."""
    from .vae_tiling import choose_encode_grid, estimate_encode_memory

    if mode == "off":
        return None
    budget = _budget(mode, available, 0)
    if budget is None:
        return None
    if mode == "auto" and (estimate_encode_memory(vae, video_shape, (1, 1), video_on_device=True).peak
                           * UNTILED_ENCODE_ALLOWANCE / GPU_ALLOWANCE <= budget):
        return None
    try:
        grid = choose_encode_grid(vae, video_shape, budget)
    except MemoryError as e:
        raise torch.OutOfMemoryError(f"VAE encode: even the finest tiling needs more than {budget} bytes") from e
    grid = _at_least_two(grid)  # whatever the replay says of one tile, the untiled pass is what was ruled out
    logger.info("VAE encode of a %s video in %dx%d tiles (vae_tiling=%s, %s bytes free)", tuple(video_shape), *grid,
                mode, available)
    return grid

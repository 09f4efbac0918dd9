"""When the Wan VAE tiles (``vae_tiling``), and into how many tiles: decided from free memory, per call.

``off``: diffusers' own untiled pass. ``auto``: untiled while the estimate of the untiled pass fits in what the
device has free, else the cheapest grid that fits. ``on``: the cheapest grid that fits (at least two tiles).
Estimates come from ``vae_tiling``'s meta-device replay of the same code (tensor storage only), with an allowance
for what a GPU adds (cuDNN workspaces, the caching allocator's rounding). Tiled decodes assemble the video in host
memory. A device too small even for the finest grid is an out-of-memory error, which carries the usual advice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .vae_tiling import VaeTiling

logger = logging.getLogger(__name__)

GPU_ALLOWANCE = 1.15
"""Measured GPU peak / estimated tensor storage (the untiled decode: 9.26 GiB measured for 8.09 estimated)."""
UNTILED_ENCODE_ALLOWANCE = 1.2
"""The same ratio for diffusers' untiled *encode*: 7.27 GiB measured at 480x832x81 on an H200, weights included,
for 5.70 GiB of activations estimated by the whole-chunk replay (diffusers' encoder takes four frames at a time;
the one-frame-at-a-time replay said 4.19, which is why this was 1.75 before the replay could take whole chunks).
Without it ``auto`` kept a 6 GiB card's start-frame encode untiled and ran out of memory (issue 10's I2V row)."""
ON_BUDGET = 2 * 2**30
"""Activation budget when tiling is forced on and free memory is unknown (a CPU run, a test)."""


ALLOCATOR_HEADROOM = 0.65
"""The share of free memory a VAE pass plans to fill. The caching allocator needs room beyond the live bytes
(blocks of sizes it cannot reuse): on an H200 under a 6 GiB limit, a decode planned to fill what was free kept
4.42 GiB live but reserved 5.88 GiB (1.33x) and failed and retried 5 times (131 at 720p under 8 GiB), each retry a
device synchronisation; the 720p decode took 11.6 s against 7.8 s for the same grid with room to spare. 1/1.33
is 0.75; 0.65 leaves a margin."""


def _budget(mode: str, available: int | None, weights: int) -> int | None:
    if available is None:
        return ON_BUDGET if mode == "on" else None
    return max(int(available * ALLOCATOR_HEADROOM / GPU_ALLOWANCE) - weights, 0)


def _untiled_fits(peak, budget: int) -> bool:
    """Whether diffusers' own untiled pass fits ``budget``, ``peak(lean)`` giving the estimate of the pass at one tile
    with the tiled passes' blocks (``lean=True``) or diffusers' (``lean=False``). The answer is diffusers' estimate,
    which the GPU allowances were measured against; the leaner blocks never need more, so when even their estimate
    is over the budget the answer is no without a replay of diffusers' blocks (the capped case: the chooser replays
    the one-tile lean pass anyway, so this costs nothing there)."""
    return peak(True) <= budget and peak(False) <= budget


def _planned(pass_name: str, what: str, plan: Callable[[], VaeTiling | None], mode: str,
             available: int | None) -> VaeTiling | None:
    """``plan()``, with one INFO line when it tiles: the grid, and the plan's own time (``plan_seconds`` on the
    record, which ``bench/e2e.py`` reads)."""
    started = time.perf_counter()
    tiling = plan()
    if tiling is not None:
        seconds = time.perf_counter() - started
        logger.info("VAE %s of %s in %dx%d tiles%s (vae_tiling=%s, %s bytes free; planned in %.2f s)", pass_name,
                    what, *tiling.grid, ", frames one at a time" if tiling.frame_split else "", mode, available,
                    seconds, extra={"plan_seconds": seconds, "vae_pass": pass_name})
    return tiling


def decode_grid(vae, latent_shape: tuple[int, ...], mode: str, available: int | None) -> VaeTiling | None:
    """The decode's tiling (grid, and whether frames are split), or None for diffusers' untiled decode."""
    return _planned("decode", f"{tuple(latent_shape)} latents",
                    lambda: _decode_tiling(vae, latent_shape, mode, available), mode, available)


def _decode_tiling(vae, latent_shape: tuple[int, ...], mode: str, available: int | None) -> VaeTiling | None:
    from .vae_tiling import choose_decode_tiling, estimate_decode_memory

    if mode == "off":
        return None
    budget = _budget(mode, available, 0)
    if budget is None:
        return None
    # lean: the one-tile pass as the chooser replays it (frames made on the device); else diffusers' decode
    if mode == "auto" and _untiled_fits(
            lambda lean: estimate_decode_memory(vae, latent_shape, (1, 1), frame_split=False, lean=lean,
                                                frames=lean).peak, budget):
        return None
    try:
        tiling = choose_decode_tiling(vae, latent_shape, budget, output_on_device=False, store_on_device=False)
    except MemoryError as e:
        raise torch.OutOfMemoryError(f"VAE decode: even the finest tiling needs more than {budget} bytes") from e
    return tiling.at_least_two() if mode == "on" else tiling


def decode_planner(vae_cls: type, vae_config: dict, dtype: torch.dtype, latent_shape: tuple[int, ...], mode: str,
                   available: int | None) -> Callable[[], object]:
    """Planning of a decode to come, for the offload manager to run in the background while the DiT samples: its
    replays then wait in the planner's caches for the decode, which finds its tiling at once when it has the memory
    predicted here (else it replays what differs). Called in the caller's thread, it builds what the replays need -
    a weightless VAE of ``vae_cls`` from ``vae_config`` and the planner's own copy of it - since building modules
    touches process-wide state; the returned planning uses only thread-local state."""
    from .vae_tiling import weightless_vae

    vae = weightless_vae(vae_cls, vae_config, dtype)
    return lambda: _decode_tiling(vae, tuple(latent_shape), mode, available)


def encode_grid(vae, video_shape: tuple[int, ...], mode: str, available: int | None) -> VaeTiling | None:
    """The encode's tiling (the image-to-video start-frame video), or None for diffusers' untiled encode."""
    return _planned("encode", f"a {tuple(video_shape)} video",
                    lambda: _encode_tiling(vae, video_shape, mode, available), mode, available)


def _encode_tiling(vae, video_shape: tuple[int, ...], mode: str, available: int | None) -> VaeTiling | None:
    from .vae_tiling import choose_encode_tiling, estimate_encode_memory

    if mode == "off":
        return None
    budget = _budget(mode, available, 0)
    if budget is None:
        return None
    if mode == "auto" and _untiled_fits(
            lambda lean: estimate_encode_memory(vae, video_shape, (1, 1), video_on_device=True, frame_split=False,
                                                lean=lean).peak * UNTILED_ENCODE_ALLOWANCE / GPU_ALLOWANCE, budget):
        return None
    try:
        tiling = choose_encode_tiling(vae, video_shape, budget)
    except MemoryError as e:
        raise torch.OutOfMemoryError(f"VAE encode: even the finest tiling needs more than {budget} bytes") from e
    # whatever the replay says of one tile, the untiled pass is what was ruled out
    return tiling.at_least_two()

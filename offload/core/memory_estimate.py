"""How much memory a job needs, estimated before any weight moves or any noise is drawn, and refused when it can
never fit.

Every axis of a job is bounded on its own (8192 pixels, 4093 frames), but their product is not: 8192x8192 with 1001
frames passes every per-field check and then asks for 17 GB of initial noise and 800 GB of decoded frames, and a
server is OOM-killed, or swaps for minutes, long after the request was accepted. This module multiplies the
numbers out first.

What is counted (all figures are bytes, and every part is named in the message):

- **host**: the initial noise and the final latents (float32, the latent shape), the decoded frames (float32
  ``[F, H, W, 3]``), one float32 working copy and the uint8 video that saving makes. Weights are not counted here:
  they are loaded once per model, not per job, and whether a machine holds them is a choice made with the
  offload options.
- **device**, the peak over the stages: the DiT's weights on the device at the chosen offload level (all of them
  resident; ``prefetch_depth + 1 + resident_blocks`` blocks layerwise; a shard plus two gathered blocks with FSDP),
  its activations (``dit_bytes_per_token`` x video tokens, split over the sequence-parallel ranks), the latents,
  and, for the decode, the VAE's weights, its working set (``vae_bytes_per_pixel`` x frame pixels) and the decoded
  video on the device.

The per-token and per-pixel figures come from the model family (``FamilyStages.memory_model``; a rough model,
documented and calibrated there) - a family without one gets the host check only. The host check is a refusal
when the job needs more than this machine has available (``MemAvailable``, and the cgroup's limit when there is
one). The device check refuses only a job that exceeds the device's *total* memory (the host application can free
the rest); where the device's memory is unknown (a CPU run) it is advisory: a warning, not a refusal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, format_bytes

logger = logging.getLogger(__name__)

FIX = "lower num_frames or the resolution (height, width)"
UNLIMITED = 2**60
"""cgroup limits at or above this mean "no limit" (v1 writes 9223372036854771712)."""


@dataclass(frozen=True)
class MemoryModel:
    """A family's rough, documented memory figures (elements, multiplied by the dtype's size here)."""

    dit_elements_per_token: int
    """Peak live activation elements of one DiT forward per video token, in the DiT's compute dtype."""
    dit_fp32_elements_per_token: int = 0
    """Of those, elements held in float32 whatever the compute dtype (normalisation, modulation)."""
    dit_blocks: int = 1
    """Repeated blocks of the DiT (layerwise and FSDP place a few of them at a time)."""
    vae_elements_per_pixel: int = 0
    """Peak working elements of the VAE decoder per pixel of one output frame, in the VAE's dtype."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Named parts, in bytes: ``host`` are all held together; ``device`` maps each stage to its parts."""

    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def device_bytes(self) -> int:
        """The peak over the stages."""
        return max((sum(parts.values()) for parts in self.device.values()), default=0)

    def device_peak_stage(self) -> tuple[str, dict[str, int]]:
        return max(self.device.items(), key=lambda item: sum(item[1].values()), default=("", {}))


def _parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{name} {format_bytes(n)}" for name, n in parts.items() if n)


def latent_bytes(latent_shape: tuple[int, ...]) -> int:
    return math.prod(latent_shape) * 4


def frame_shape(latent_shape: tuple[int, ...], temporal_factor: int, spatial_factor: int) -> tuple[int, int, int, int]:
    """``(frames, height, width, 3)`` decoded from a ``[B, C, T, h, w]`` latent (the batch's frames one after the
    other)."""
    batch, _, frames, height, width = latent_shape
    return batch * ((frames - 1) * temporal_factor + 1), height * spatial_factor, width * spatial_factor, 3


def host_parts(latent_shape: tuple[int, ...] | None, frames: tuple[int, int, int, int]) -> dict[str, int]:
    """What a job holds in host memory at once (see the module docstring)."""
    pixels = math.prod(frames)
    parts = {}
    if latent_shape is not None:
        parts["initial noise"] = latent_bytes(latent_shape)
        parts["latents"] = latent_bytes(latent_shape)
    parts["decoded frames (float32)"] = pixels * 4
    parts["saving: float32 working copy"] = pixels * 4
    parts["saving: uint8 video"] = pixels * 2
    return parts


TILED_WORKING_SET_SHARE = 4
"""With exact VAE tiling available, the decode's working set is bounded by its tiles; the estimate takes a 2x2 grid
(a quarter of the frame, halos aside) and the video assembled in host memory. The tiling itself chooses its grid
from the memory actually free, so this only keeps the up-front check from refusing what tiling makes fit."""


def decode_parts(model: MemoryModel | None, frames: tuple[int, int, int, int], vae_bytes: int,
                 vae_itemsize: int, tiled: bool = False) -> dict[str, int]:
    """The VAE decode's device peak: weights, working set per frame pixel, and the decoded video (in the VAE's
    dtype, then float32 on its way out) - or, when the decode may tile, a tile's working set and no video."""
    count, height, width, _ = frames
    parts = {"VAE weights": vae_bytes}
    if model is not None:
        working = model.vae_elements_per_pixel * height * width * vae_itemsize
        parts["VAE decode working set"] = working // TILED_WORKING_SET_SHARE if tiled else working
    if not tiled:
        parts["decoded video on the device"] = count * height * width * 3 * (vae_itemsize + 3 * 4)
    return parts


def dit_parts(model: MemoryModel | None, tokens: int, dit_bytes: int, dit_itemsize: int, latent_shape: tuple[int, ...],
              *, layerwise_blocks: int | None, shards: int = 1, sequence_split: int = 1) -> dict[str, int]:
    """The DiT stage's device peak. ``layerwise_blocks``: blocks on the device at once when streaming (None:
    the DiT is resident, or sharded over ``shards`` ranks)."""
    blocks = model.dit_blocks if model is not None else 1
    block_bytes = dit_bytes // max(blocks, 1)
    if layerwise_blocks is not None:
        weights = min(dit_bytes, layerwise_blocks * block_bytes)
    elif shards > 1:
        weights = dit_bytes // shards + 2 * block_bytes  # a shard, plus the gathered block and the next one
    else:
        weights = dit_bytes
    parts = {"DiT weights on the device": weights}
    if model is not None:
        per_token = model.dit_elements_per_token * dit_itemsize + model.dit_fp32_elements_per_token * 4
        parts["DiT activations"] = per_token * math.ceil(tokens / max(sequence_split, 1))
    parts["latents on the device"] = 8 * latent_bytes(latent_shape)  # noise, prediction, scheduler history
    return parts


# ------------------------------------------------------------------------------------------- what is available


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max" (cgroup v2 without a limit)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (page cache that can be reclaimed counts as free)."""
    for limit_file, usage_file, stat_file, inactive in (
        (root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file"),  # v2
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes",
         root / "memory" / "memory.stat", "total_inactive_file"),  # v1
    ):
        limit = _read_int(limit_file)
        if limit is None or limit >= UNLIMITED:
            continue
        usage = _read_int(usage_file) or 0
        return max(limit - max(usage - _stat_value(stat_file, inactive), 0), 0)
    return None


def available_host_bytes() -> int | None:
    """Host memory a new allocation can get now: the smallest of ``MemAvailable`` (or psutil's figure) and what the
    cgroup limit leaves; None when neither is known."""
    known = []
    try:
        import psutil

        known.append(int(psutil.virtual_memory().available))
    except ImportError:
        meminfo = _meminfo_available()
        if meminfo is not None:
            known.append(meminfo)
    cgroup = _cgroup_available()
    if cgroup is not None:
        known.append(cgroup)
    return min(known) if known else None


def device_total_bytes(device: torch.device) -> tuple[int, int] | None:
    """(free, total) of a CUDA device; None where device memory is unknown (the CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


# --------------------------------------------------------------------------------------------------- the check


def check_fits(estimate: MemoryEstimate, what: str, device: torch.device | None = None) -> None:
    """Refuse a job whose host part exceeds the available host memory, or whose device peak exceeds the device's
    total memory; warn when the device peak exceeds what is free now. ``what`` names the job in the message."""
    available = available_host_bytes()
    needed = estimate.host_bytes
    logger.debug("memory estimate for %s: host %s (%s); device peak %s", what, format_bytes(needed),
                 _parts(estimate.host), format_bytes(estimate.device_bytes))
    if available is not None and needed > available:
        raise ConfigError(
            "size", what,
            f"needs about {format_bytes(needed)} of host memory ({_parts(estimate.host)}), but "
            f"{format_bytes(available)} are available",
            FIX,
        )
    if device is None or not estimate.device:
        return
    stage, parts = estimate.device_peak_stage()
    peak = sum(parts.values())
    memory = device_total_bytes(device)
    if memory is None:
        if available is not None and peak > available:
            logger.warning(
                "%s: the %s stage may need about %s on %s (%s), more than the %s of memory available; it may run "
                "out of memory", what, stage, format_bytes(peak), device, _parts(parts), format_bytes(available),
            )
        return
    free, total = memory
    if peak > total:
        raise ConfigError(
            "size", what,
            f"needs about {format_bytes(peak)} on {device} during {stage} ({_parts(parts)}), more than the device's "
            f"{format_bytes(total)}",
            FIX + ", or turn on more offload options (or use more GPUs)",
        )
    if peak > free:
        logger.warning("%s: the %s stage may need about %s on %s, %s free now (%s)", what, stage,
                       format_bytes(peak), device, format_bytes(free), _parts(parts))

"""Out-of-memory handling: turn a bare CUDA OOM into advice along the seed's recommended order.

Also a device-memory budget: the manager refuses to place weights beyond it, through the same error path as a
real OOM. That lets a user reserve VRAM for other programs, and lets CPU-only tests exercise OOM handling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from ..config import OffloadConfig
from ..errors import OffloadOutOfMemoryError

logger = logging.getLogger(__name__)


class BudgetExceeded(torch.OutOfMemoryError):
    """Placing these weights would exceed the manager's device-memory budget."""


def oom_advice(config: OffloadConfig) -> str:
    """The seed's recommended next step for this configuration."""
    step = config.next_step_to_enable()
    if step is None:
        return (
            "Every offload option is already on. Fix: lower num_frames or the resolution, or use more GPUs "
            "(num_gpus with use_fsdp_inference)."
        )
    if step == ("use_fsdp_inference",):
        return "Fix: enable use_fsdp_inference (with dit_layerwise_offload=False) to shard the DiT over the GPUs."
    names = " and ".join(name if isinstance(getattr(config, name), bool) else f"{name}=on" for name in step)
    first = config.recommended_steps()[0] == step
    which = "the first step of the recommended order on one GPU" if first else "the next step of the recommended order"
    return f"Fix: enable {names} ({which})."


def device_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(free, total) bytes of a CUDA device; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def available_device_bytes(device: torch.device) -> int | None:
    """What this process could still allocate on a CUDA device: driver-free memory plus the caching allocator's
    unused reserve, capped by a per-process memory fraction when one is set; None elsewhere."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        available = min(available, int(fraction(device) * total) - allocated)
    return max(int(available), 0)


@contextlib.contextmanager
def oom_guard(stage: str, config: OffloadConfig, device: torch.device) -> Iterator[None]:
    """Run a stage; on out-of-memory free the allocator's cache and raise ``OffloadOutOfMemoryError``."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        free, total = device_memory(device)
        if isinstance(e, BudgetExceeded):
            free, total = e.args[1], e.args[2]
        logger.warning("out of memory during %s", stage)
        raise OffloadOutOfMemoryError(stage, free, total, oom_advice(config)) from e

"""Loaded weights live in the process's own memory, never in a mapping of the file they came from.

``from_pretrained`` (diffusers and transformers alike) leaves every tensor memory-mapped from its safetensors file.
A component used straight from there - the text encoder computing on the CPU with ``text_encoder_cpu_offload``, the
default - then depends on the file staying unchanged for the life of the server: rewriting it in place (``cp`` over
it, ``rsync --inplace``) silently changes the live weights, and truncating it kills the whole process with SIGBUS
at the next prompt. So every module the manager loads is passed through :func:`detach_from_files` once: each tensor
whose memory is inside a file mapping is copied into ordinary memory (one tensor at a time, so the peak is the
module plus its largest tensor), and the mapping is dropped with the last reference to it.
"""

from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from .tensors import tensor_refs

logger = logging.getLogger(__name__)


def file_mapped_ranges() -> list[tuple[int, int]] | None:
    """Sorted ``(start, end)`` address ranges of this process's file-backed mappings (Linux ``/proc/self/maps``);
    None where that is unknown (then every tensor is treated as possibly mapped)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # address perms offset dev inode path: a mapping with an inode and a path is backed by a file.
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16)))
    ranges.sort()
    return ranges


def _in_ranges(address: int, ranges: list[tuple[int, int]], starts: list[int]) -> bool:
    index = bisect.bisect_right(starts, address) - 1
    return index >= 0 and ranges[index][0] <= address < ranges[index][1]


def detach_from_files(module: nn.Module) -> int:
    """Copy every tensor of ``module`` that lives in a file mapping into private memory; return the bytes copied.

    Tied tensors (one tensor registered under two names) are copied once and stay tied.
    """
    if not isinstance(module, nn.Module):
        return 0
    ranges = file_mapped_ranges()
    starts = [start for start, _ in ranges] if ranges is not None else []
    copies: dict[int, torch.Tensor] = {}
    copied = 0
    with torch.no_grad():
        for ref in tensor_refs(module, unique=False):
            tensor = ref.get()
            if tensor.device.type != "cpu" or tensor.is_meta:
                continue
            private = copies.get(id(tensor))
            if private is None:
                storage = tensor.untyped_storage()
                if storage.nbytes() == 0:
                    continue
                if ranges is not None and not _in_ranges(storage.data_ptr(), ranges, starts):
                    continue
                private = torch.empty_like(tensor, memory_format=torch.contiguous_format)
                private.copy_(tensor)
                copies[id(tensor)] = private
                copied += private.numel() * private.element_size()
            ref.rebind(private)
    if copied:
        logger.debug("copied %.2f GiB out of file mappings into private memory", copied / 2**30)
    return copied

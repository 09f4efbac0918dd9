"""Which DiT blocks stay on the GPU and which stream: the residency policy of layerwise offload.

Separate from the streaming pipeline (``layerwise.py``) because it is a decision, not a mechanism: given the
device's free memory and what one forward needed, how many blocks can stay resident, and which ones.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

GiB = 2**30


def spread_resident(num_blocks: int, num_resident: int) -> tuple[bool, ...]:
    """Which of ``num_blocks`` blocks stay resident when ``num_resident`` do.

    The streamed blocks are spaced evenly and each comes at the end of its run of resident blocks, so the copy of
    every streamed block overlaps as much compute as possible. ``(k + 1) * B // S - 1`` for ``k < S`` is strictly
    increasing because ``B / S >= 1``, and always ends with the last block.
    """
    num_resident = max(0, min(num_resident, num_blocks))
    num_streamed = num_blocks - num_resident
    streamed = {(k + 1) * num_blocks // num_streamed - 1 for k in range(num_streamed)}
    return tuple(i not in streamed for i in range(num_blocks))


def plan_auto_resident(
    *,
    available_bytes: int,
    activation_bytes: int,
    margin_bytes: int,
    block_bytes: int,
    slot_bytes: int,
    num_blocks: int,
) -> int:
    """How many blocks ``resident_blocks="auto"`` keeps on the GPU.

    ``available_bytes`` is what the process could still allocate after a forward (driver-free plus the caching
    allocator's unused reserve), ``activation_bytes`` the peak that forward needed above its starting point. All
    blocks fit if they do once the streaming slots are freed; otherwise at least one block streams, so the slots
    stay.
    """
    budget = available_bytes - activation_bytes - margin_bytes
    if budget <= 0 or block_bytes <= 0:
        return 0
    if budget + slot_bytes >= num_blocks * block_bytes:
        return num_blocks
    return max(0, min(num_blocks - 1, budget // block_bytes))


class AutoResidency:
    """The ``resident_blocks="auto"`` measurement: the first forward (and any forward with larger inputs) streams
    every block while its activation peak is measured; after it, :meth:`decide` says how many blocks fit."""

    def __init__(self, device: torch.device, log: logging.Logger = logger):
        self.device = device
        self.log = log
        """Where decisions are logged (the offloader's logger: one place to read about one model)."""
        self.measured_numel = -1
        """Input size the decision was measured at; -1: not yet measured."""
        self._pending_numel: int | None = None
        self._base: int | None = None

    def reset(self) -> None:
        self.measured_numel = -1
        self.abort()

    def abort(self) -> None:
        """Drop an unfinished measurement (the forward raised): the next forward measures again."""
        self._pending_numel = self._base = None

    def needs_measurement(self, inputs_numel: int) -> bool:
        return inputs_numel > self.measured_numel

    def begin(self, inputs_numel: int) -> None:
        self._pending_numel = inputs_numel
        self._base = None
        if self.device.type == "cuda":
            # Resets the process's peak statistic: the only way to read this forward's own peak.
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)

    def memory_figures(self, base: int | None) -> tuple[int, int, int] | None:
        """(available bytes, total bytes, activation peak bytes) after a measured forward; None without CUDA.
        Available is what the process could still allocate: driver-free plus the caching allocator's unused reserve."""
        if base is None or self.device.type != "cuda":
            return None
        activation = torch.cuda.max_memory_allocated(self.device) - base
        free, total = torch.cuda.mem_get_info(self.device)
        unused_reserve = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free + unused_reserve, total, activation

    def finish(self, *, block_bytes: int, slot_bytes: int, num_blocks: int, name: str) -> int | None:
        """After a measured forward: how many blocks to keep resident, or None (nothing measured / no CUDA)."""
        if self._pending_numel is None:
            return None
        numel, base = self._pending_numel, self._base
        self.abort()
        self.measured_numel = numel
        figures = self.memory_figures(base)
        if figures is None:
            self.log.info("%s: resident_blocks=auto: no CUDA memory figures on %s; every block keeps streaming", name, self.device)
            return None
        available, total, activation = figures
        margin = max(GiB, total // 20)
        count = plan_auto_resident(
            available_bytes=available,
            activation_bytes=activation,
            margin_bytes=margin,
            block_bytes=block_bytes,
            slot_bytes=slot_bytes,
            num_blocks=num_blocks,
        )
        self.log.info(
            "%s: resident_blocks=auto: the forward needed %.2f GiB of activations; %.2f GiB available minus %.2f GiB "
            "margin -> %d of %d blocks resident, %d streamed",
            name, activation / GiB, available / GiB, margin / GiB, count, num_blocks, num_blocks - count,
        )
        return count

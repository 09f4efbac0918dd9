"""One set of GPU slots for several streamed models that take turns: the two experts of a Wan2.2 A14B model.

The experts never run at the same time (each denoising step runs one), and their blocks have the same layout, so
giving each its own ``prefetch_depth + 1`` slots would only double the device memory of streaming. Instead their
offloaders share one ``BlockSlots`` and one free list: the offloader that runs a forward *takes its turn*, and any
other member first gives back what it holds (copies it had queued for its own next forward are forgotten; the slots
return to the free list). The copy stream and the per-slot events are the slots', so ordering is unchanged: a copy
into a slot still waits for that slot's last reader, whichever expert it was.

The switch itself costs no stall: the denoising loop tells the running offloader, before the last step of its
expert, which offloader runs next (``LayerwiseOffloader.hand_over``); when that offloader's last forward reaches the
point where it would prefetch its own first block for a next forward, it issues the next expert's first blocks into
the free slots instead, queued as that expert's, so they cross PCIe while the current expert's last blocks compute.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch

from .block_slots import BlockSlots
from .stored_format import StagedLayout

logger = logging.getLogger(__name__)


class SharedSlots:
    """Streaming slots shared by offloaders whose blocks have one layout; see the module docstring."""

    def __init__(self, name: str = "shared slots"):
        self.name = name
        self.slots: BlockSlots | None = None
        self.free: deque[int] = deque()
        """The free list every holder uses (the same deque object)."""
        self._holders: list[Any] = []
        self._owner: Any = None
        self._key: tuple | None = None

    def acquire(self, member: Any, nbytes: int, count: int, device: torch.device,
                staged: StagedLayout | None) -> BlockSlots | None:
        """The shared slots for ``member`` (made on first use), or None when its blocks do not fit them (another
        layout, count or stored form): it then uses slots of its own."""
        key = (nbytes, count, device, None if staged is None else staged.stored.nbytes)
        if self.slots is None:
            self.slots = BlockSlots(nbytes, count, device, staged=staged)
            self.free.clear()
            self.free.extend(range(count))
            self._key = key
            self._owner = member
        elif key != self._key:
            logger.warning("%s: blocks of %d bytes (%s) do not fit the shared slots of %s; using separate slots",
                           self.name, nbytes, "stored narrow" if staged else "as computed", self._key)
            return None
        if member not in self._holders:
            self._holders.append(member)
        return self.slots

    def holds(self, member: Any) -> bool:
        return any(h is member for h in self._holders)

    def take_turn(self, member: Any) -> None:
        """``member`` is about to stream: every other holder gives back the slots it has queued."""
        if self._owner is member:
            return
        for other in self._holders:
            if other is not member:
                other.yield_slots()
        self._owner = member

    def reset_free(self, member: Any) -> None:
        """After ``member`` re-placed its blocks (its queue empty): every slot is free, the others having yielded."""
        self.take_turn(member)
        for other in self._holders:
            if other is not member:
                other.yield_slots()
        self.free.clear()
        self.free.extend(range(self.slots.count))

    def release(self, member: Any) -> None:
        """``member`` no longer streams (closed, released, all blocks resident); the slots are freed with the last
        holder."""
        self._holders = [h for h in self._holders if h is not member]
        if self._owner is member:
            self._owner = None
        if not self._holders and self.slots is not None:
            self.slots.close()
            self.slots = None
            self.free.clear()
            self._key = None

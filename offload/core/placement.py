"""Whole-module placement: a host master copy, and a device copy that exists only while the module is in use.

Used for the VAE, the encoders and the resident DiT. The host copy never changes during inference, so moving a
module "back" is free: its parameters are simply pointed at the host copy again and the device copy is dropped.
No device-to-host copy ever happens.

Weight patches (LoRAs, :meth:`ModulePlacer.set_weight_patches`) are added to the device copy only, right after it
is made; a new LoRA or strength copies the patched tensors from the host copy again and adds the new terms. That
is exact (no subtract-and-round), costs one copy of the patched tensors, and leaves the host copy untouched; a
side path instead would cost extra matmuls over every token at every step for as long as the LoRA is on.
"""

from __future__ import annotations

import enum
import logging

import torch
from torch import nn

from .host_memory import FlatLayout, HostArena
from .tensors import named_tensors, rebind_named
from .weight_patches import NO_PATCHES, PatchSet, check_targets, patch_tensor

logger = logging.getLogger(__name__)


class Placement(enum.Enum):
    """Where a component's weights are right now."""

    HOST_PINNED = "host (pinned)"
    HOST_PAGEABLE = "host (pageable)"
    GPU = "gpu"
    LAYERWISE = "layerwise (blocks stream from host)"
    FSDP = "fsdp (sharded over workers)"


class ModulePlacer:
    """Owns one module's host master copy (one flat arena, pinned if asked) and its optional device copy.

    Construction moves the module's tensors into the arena (one tensor at a time, so host memory never holds two
    copies of the module). ``to_device`` makes one flat device buffer and fills it with one copy; ``to_host``
    drops it.
    """

    def __init__(self, name: str, module: nn.Module, pin: bool, max_pinned_bytes: int | None = None):
        self.name = name
        self.module = module
        self.pin_requested = pin
        named = named_tensors(module)
        self.layout = FlatLayout.of(named)
        fits = max_pinned_bytes is None or self.layout.nbytes <= max_pinned_bytes
        if pin and not fits:
            logger.info("%s: %.2f GiB stays pageable: pinning it would exceed max_pinned_memory_gb", name,
                        self.layout.nbytes / 2**30)
        self.arena = HostArena(self.layout.nbytes, pin=pin and fits)
        for slot, (tensor_name, tensor) in zip(self.layout.slots, named):
            view = slot.view_into(self.arena.buffer)
            view.copy_(tensor.detach())
            rebind_named(module, tensor_name, view)
        self.device_buffer: torch.Tensor | None = None
        self._patches: PatchSet = NO_PATCHES
        """What the device copy should carry."""
        self._patched: tuple[PatchSet, tuple[str, ...]] = (NO_PATCHES, ())
        """What the device copy carries now, and which of its tensors that changed."""

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def placement(self) -> Placement:
        if self.device_buffer is not None:
            return Placement.GPU
        return Placement.HOST_PINNED if self.arena.pinned else Placement.HOST_PAGEABLE

    def to_device(self, device: torch.device) -> nn.Module:
        """Give the module a device copy (on a CPU-only machine a separate host copy, so the same code runs)."""
        if self.device_buffer is None:
            buffer = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=device)
            # From pinned memory this copy is asynchronous on the current stream; kernels that use the weights
            # are queued after it on the same stream, so no synchronisation is needed.
            buffer.copy_(self.arena.buffer, non_blocking=self.arena.pinned)
            for slot in self.layout.slots:
                rebind_named(self.module, slot.name, slot.view_into(buffer))
            self.device_buffer = buffer
            self._patched = (NO_PATCHES, ())
            self._sync_patches()
        return self.module

    @property
    def weight_patches(self) -> PatchSet:
        return self._patches

    def set_weight_patches(self, patches: PatchSet | None) -> None:
        """Carry ``patches`` (LoRAs with strengths; None: none) in the device copy, now if there is one, else from
        the next :meth:`to_device` on. The host copy is never written."""
        patches = patches or NO_PATCHES
        if patches != self._patches:
            check_targets(patches, {s.name: s.shape for s in self.layout.slots}, self.name)
            self._patches = patches
        self._sync_patches()

    def _sync_patches(self) -> None:
        if self.device_buffer is None or self._patched[0] == self._patches:
            return
        slots = {s.name: s for s in self.layout.slots}
        targets = self._patches.targets()
        with torch.inference_mode(False), torch.no_grad():
            for name in self._patched[1]:  # exact undo: the host bytes again
                slots[name].view_into(self.device_buffer).copy_(slots[name].view_into(self.arena.buffer),
                                                                non_blocking=self.arena.pinned)
            for name, terms in targets.items():
                patch_tensor(slots[name].view_into(self.device_buffer), terms)
        self._patched = (self._patches, tuple(targets))
        logger.info("%s: weight patches on the device copy: %s", self.name, self._patches.describe())

    def holds_device_copy(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory is inside this module's device copy (what a test asks to tell, on a CPU-only
        machine, a module that runs from its device copy from one that runs from host memory)."""
        buffer = self.device_buffer
        if buffer is None or tensor.device != buffer.device:
            return False
        start = buffer.data_ptr()
        return start <= tensor.data_ptr() < start + buffer.numel()

    def to_host(self) -> None:
        """Point the module back at its host copy and drop the device copy. Idempotent."""
        if self.device_buffer is None:
            return
        for slot in self.layout.slots:
            rebind_named(self.module, slot.name, slot.view_into(self.arena.buffer))
        self.device_buffer = None
        self._patched = (NO_PATCHES, ())

    def close(self) -> None:
        self.to_host()
        self.arena.release()

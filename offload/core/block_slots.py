"""GPU slots for streamed blocks, the copy stream, and the events that order copies against compute.

A block streamed through the GPU needs somewhere to land. Rather than allocating a fresh copy per block per step
(and paying the caching allocator's cross-stream bookkeeping with ``record_stream``), a few fixed slots are
allocated once; each is one flat byte buffer the size of a block's ``FlatLayout``, so one block moves with one
``copy_`` (one DMA). Because the slots live as long as the offloader, the allocator never sees them freed while a
stream still uses them, and no ``record_stream`` is needed.

Ordering, per slot ``s``:

- ``load(s, host)`` runs on the dedicated copy stream. It first waits for ``free[s]``, recorded on the compute stream
  right after the last block that read ``s`` was enqueued, so a copy never overwrites weights still in use.
- ``wait_loaded(s)`` makes the compute stream wait for ``loaded[s]`` before the block in ``s`` is enqueued.
- ``release(s)`` records ``free[s]`` on the compute stream after that block.

None of these touches the host: in steady state the CPU never waits for the GPU. On a CPU device there is no stream
and no event; ``load`` is a plain synchronous ``copy_``. The slot logic above it is the same, which is what lets CI
exercise it without a GPU.

Blocks stored narrower than they compute (fp8, ``stored_format.StagedLayout``) take one more step: ``load`` copies
the stored bytes into one *raw* buffer, then widens them into the slot (``StagedLayout.decode``), both on the copy
stream. The raw buffer is used by that stream only, so stream order alone keeps a copy from overwriting bytes a
decode still reads, and one raw buffer serves every slot. The copy is issued before the wait for the slot to be
free (it touches only the raw buffer), so the transfer of the next block overlaps the running block's compute as
before, and the decode - a few memory-bound kernels - runs beside the compute stream instead of on it.

A block may also be *transformed* after its copy (``load(..., transform=...)``: a LoRA merged into the slot, see
``weight_patches``): the transform is enqueued on the copy stream after the copy and decode and before ``loaded``
is recorded, so it overlaps the running block's compute exactly as the copy does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .stored_format import StagedLayout
from .widen_kernel import decoder_for


class BlockSlots:
    """``count`` GPU buffers of ``nbytes`` bytes each, plus the copy stream and the per-slot events."""

    def __init__(self, nbytes: int, count: int, device: torch.device, staged: StagedLayout | None = None):
        self.device = device
        self.nbytes = nbytes
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self.staged = staged
        self.raw: torch.Tensor | None = None
        """Stored bytes of the block being widened (staged blocks only)."""
        self._decode_views: list = []
        self._decode = StagedLayout.decode
        if staged is not None:
            self._decode = decoder_for(device, staged)
            self.raw = torch.empty(staged.stored.nbytes, dtype=torch.uint8, device=device)
            self._decode_views = [staged.views(self.raw, buffer) for buffer in self.buffers]
        self._cuda = device.type == "cuda"
        if self._cuda:
            # Created here, with the offloader, never at import: a stream belongs to a device and a process.
            # Copies go to their own stream so that they run on a copy engine while the compute stream's kernels run.
            self.copy_stream = torch.cuda.Stream(device)
            # Plain (non-timing) events: cheaper to record and wait on.
            self._loaded = [torch.cuda.Event() for _ in range(count)]
            self._free = [torch.cuda.Event() for _ in range(count)]

    @property
    def count(self) -> int:
        return len(self.buffers)

    @property
    def total_bytes(self) -> int:
        """Device memory of the slots (and of the raw buffer of staged blocks)."""
        raw = 0 if self.raw is None else self.raw.numel()
        return self.nbytes * len(self.buffers) + raw

    def load(self, slot: int, host_flat: torch.Tensor, transform: Callable[[], None] | None = None) -> None:
        """Copy one block's bytes from host memory into ``slot`` (staged: into the raw buffer, then widen them into
        ``slot``), ordered after the slot's last reader. ``transform`` (a LoRA merge: ``weight_patches``) then runs
        on the slot's contents, on the copy stream, before the slot counts as loaded."""
        if not self._cuda:
            if self.staged is None:
                self.buffers[slot].copy_(host_flat)
            else:
                self.raw.copy_(host_flat)
                StagedLayout.decode(self._decode_views[slot])
            if transform is not None:
                transform()
            return
        with torch.cuda.stream(self.copy_stream):
            if self.staged is None:
                # The slot may still be read by kernels of the block that used it last; `free` was recorded after
                # them on the compute stream. Waiting on an event never recorded is a no-op (first use of a slot).
                self.copy_stream.wait_event(self._free[slot])
                # non_blocking: from page-locked memory this is a true async DMA and the host returns at once. From
                # pageable memory CUDA stages the bytes through a driver buffer, so the host blocks for about the
                # copy time: still correct, but the transfer is then no longer hidden.
                self.buffers[slot].copy_(host_flat, non_blocking=True)
            else:
                # The raw buffer's last reader is the previous decode, earlier on this same stream: no event needed,
                # and the transfer need not wait for the slot.
                self.raw.copy_(host_flat, non_blocking=True)
                self.copy_stream.wait_event(self._free[slot])
                self._decode(self._decode_views[slot])
            if transform is not None:
                transform()  # after the copy (and widening) on this stream; compute waits on `loaded` below
            self._loaded[slot].record(self.copy_stream)

    def wait_loaded(self, slot: int) -> None:
        """Make the compute stream wait (on the GPU, not the host) until ``slot``'s last copy has landed."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._loaded[slot])

    def release(self, slot: int) -> None:
        """Mark ``slot`` free once everything enqueued so far on the compute stream has run."""
        if self._cuda:
            self._free[slot].record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        """Block the host until every copy and every kernel of this device has finished. Never in steady state:
        only before memory that streams may still touch is freed or unpinned (close, demotion)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Free the slots. Idempotent. Synchronizes first so no copy is still writing a slot being freed."""
        if not self.buffers:
            return
        self.synchronize()
        self.buffers = []
        self.raw = None
        self._decode_views = []

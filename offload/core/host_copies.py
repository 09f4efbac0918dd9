"""Copies between the device and regions of host tensors that never make the device wait for the host.

Why: PyTorch copies a device tensor into a host region that is not one contiguous block (a tile's columns of a
frame, one frame of a channel-major video), or a strided host region onto the device, through a fresh *pageable*
buffer. Such a copy is synchronous: the host waits until the device has finished everything queued before it, then
copies on the CPU, and only then queues more work, so the device idles once per copy. A tiled VAE pass makes one
such copy per tile and latent frame (42 for a 480p81 decode in two tiles, and as many of the tiles' inputs).

Here a device tensor goes first, whole, into a page-locked buffer of its own shape (one DMA, queued behind the work
that produces it); the host puts it in its place later, once that copy has completed, while the device computes
what comes next (:class:`HostWriter`). The other way, a strided host region is gathered into a page-locked buffer
on the CPU and sent by DMA (:func:`to_device`). Page-locked buffers come from PyTorch's caching host allocator,
which keeps a buffer from being reused before the copy that reads or writes it has completed.
"""

from __future__ import annotations

from collections import deque

import torch


def _dma_ready(host: torch.Tensor) -> bool:
    """Whether a copy between ``host`` and the device can be a single asynchronous DMA."""
    return host.is_pinned() and host.is_contiguous()


def to_device(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``src.to(device)`` without a synchronous copy: a host tensor that is not page-locked and contiguous is first
    gathered into one that is (on the CPU, while the device works on what is queued)."""
    if src.device.type != "cpu" or device.type != "cuda":
        return src.to(device)
    if not _dma_ready(src):
        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staged.copy_(src)
        src = staged
    return src.to(device, non_blocking=True)


class HostWriter:
    """Writes device tensors into regions of host tensors; every write has landed once :meth:`finish` returns.

    ``depth``: how many staged copies may wait for their turn; past it the host waits for the oldest one, which
    keeps the device at most that many copies ahead and the page-locked memory in use bounded."""

    def __init__(self, depth: int = 3):
        self.depth = depth
        self._pending: deque[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor]] = deque()

    def write(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)``, possibly later: ``dst`` must not be read before :meth:`finish`."""
        if dst.device.type != "cpu" or src.device.type != "cuda":
            dst.copy_(src)
            return
        if _dma_ready(dst) and dst.dtype == src.dtype:
            dst.copy_(src, non_blocking=True)  # lands in place; finish() waits for the stream
            return
        staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        staged.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(src.device))
        self._pending.append((done, staged, dst))
        self._land(wait=len(self._pending) > self.depth)

    def _land(self, wait: bool) -> None:
        """Put the staged copies that have completed in place (and the oldest even if not, with ``wait``)."""
        while self._pending and (wait or self._pending[0][0].query()):
            done, staged, dst = self._pending.popleft()
            done.synchronize()
            dst.copy_(staged)
            wait = False

    def finish(self, device: torch.device | None = None) -> None:
        """Wait for every write: the staged ones put in place, the direct ones (on ``device``'s stream) landed."""
        while self._pending:
            self._land(wait=True)
        if device is not None and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

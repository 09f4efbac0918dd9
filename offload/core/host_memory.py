"""Host (CPU) memory that holds the master copy of offloaded weights.

Why an arena and not ``tensor.pin_memory()`` per parameter: PyTorch's pinned allocator rounds every allocation
up to a power of two, so pinning a model's few hundred tensors one by one can nearly double its host footprint,
and each tiny copy pays a launch. Instead every tensor of a module (or of a group of modules) is laid out in one
flat, page-aligned byte buffer; parameters become views into it; and the whole buffer is page-locked once with
``cudaHostRegister`` - the exact bytes, no rounding. A group of tensors then moves to the GPU as one large copy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ALIGNMENT = 256
"""Byte alignment of each tensor inside an arena: satisfies every dtype and keeps DMA copies on fast paths."""
PAGE = 4096


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor sits inside a flat buffer."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize

    def view_into(self, flat: torch.Tensor) -> torch.Tensor:
        """A typed, shaped view of this tensor's bytes inside ``flat`` (a 1-D uint8 tensor)."""
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class FlatLayout:
    """The byte layout of a set of named tensors, shared by every copy (host or GPU) of identically shaped groups."""

    slots: tuple[TensorSlot, ...]
    nbytes: int

    @classmethod
    def of(cls, named_tensors: list[tuple[str, torch.Tensor]]) -> FlatLayout:
        slots = []
        offset = 0
        for name, tensor in named_tensors:
            slot = TensorSlot(name, offset, tuple(tensor.shape), tensor.dtype)
            slots.append(slot)
            offset = align_up(offset + slot.nbytes)
        return cls(tuple(slots), offset)

    def matches(self, named_tensors: list[tuple[str, torch.Tensor]]) -> bool:
        return len(named_tensors) == len(self.slots) and all(
            slot.name == name and slot.shape == tuple(t.shape) and slot.dtype == t.dtype
            for slot, (name, t) in zip(self.slots, named_tensors)
        )


class HostArena:
    """One flat host buffer, optionally page-locked, that backs many tensors.

    The buffer is plain pageable memory from PyTorch's CPU allocator, aligned to a page; pinning registers that
    exact range with the CUDA driver. ``pin_bytes`` pins only the first bytes (a host-RAM budget: the rest stays
    pageable, still usable, copied more slowly); callers choose a prefix that ends on a boundary of what they copy,
    so every copy reads memory that is either all pinned or all pageable. ``release()`` unregisters it; the memory
    itself is freed when the last view goes away.
    """

    def __init__(self, nbytes: int, pin: bool, pin_bytes: int | None = None):
        self.nbytes = nbytes
        raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        self.buffer = raw[start : start + nbytes]
        self.pinned_bytes = 0
        """How many bytes, from the start, are page-locked."""
        wanted = nbytes if pin_bytes is None else max(0, min(pin_bytes, nbytes))
        if pin and wanted:
            prefix = self.buffer[:wanted]
            advise_huge_pages(prefix)
            if register_host_memory(prefix):
                self.pinned_bytes = wanted

    @property
    def pinned(self) -> bool:
        """Whether any of it is page-locked."""
        return self.pinned_bytes > 0

    def release(self) -> None:
        """Unpin. Idempotent; the views stay valid as pageable memory until dropped."""
        if self.pinned_bytes:
            unregister_host_memory(self.buffer[: self.pinned_bytes])
            self.pinned_bytes = 0


PIN_SHARE_OF_RAM = 0.45
"""The default share of physical RAM the pack may page-lock (``max_pinned_memory_gb="auto"``).

ComfyUI 0.3.64 pins nothing; its later versions cap pinned memory at 45% of RAM on Windows (where the driver
refuses more than about half), and page-locked memory can neither be swapped nor reclaimed, so a cap below half
of RAM leaves the OS, ComfyUI and the unpinned rest of the weights room on a 32 GB machine (14.4 GB pinned at
most)."""


HOST_SHARE_OF_RAM = 0.60
"""The default share of physical RAM the weights may hold (``max_host_memory_gb="auto"``).

Why 60%: a 32 GB machine then keeps about 13 GB for the process's own overhead (CUDA libraries and context, 3-5 GB
measured on an H200 host), ComfyUI, the OS and a browser, so a Wan 14B fp8 run peaks under 24 GiB RSS; a 64 GB
machine holds the 14B DiT, UMT5 and CLIP together (26 GB fp8) and never re-reads them."""


def physical_memory_bytes() -> int:
    """Total RAM of the machine (``MemTotal``), or 0 when it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except (ImportError, OSError, AttributeError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_pin_limit() -> int:
    """``PIN_SHARE_OF_RAM`` of the machine's RAM, in bytes."""
    return int(physical_memory_bytes() * PIN_SHARE_OF_RAM)


def default_host_limit() -> int:
    """``HOST_SHARE_OF_RAM`` of the machine's RAM, in bytes; no limit where the RAM cannot be read (then the pack
    holds what FastVideo holds, rather than re-reading every encoder for want of a number)."""
    physical = physical_memory_bytes()
    return int(physical * HOST_SHARE_OF_RAM) if physical > 0 else sys.maxsize


def return_freed_memory() -> None:
    """After a large host copy is dropped: collect what only cycles still hold, and ask glibc to give freed heap
    pages back to the OS (``malloc_trim``). Tensors under glibc's mmap threshold (up to 32 MB, so most of a whole
    module's weights) live on the heap, and without a trim the process keeps their pages. Best effort."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


MADV_HUGEPAGE = 14


def advise_huge_pages(buffer: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages before pinning: registering 2 MiB pages is about 3x faster than 4 KiB
    pages (measured: 2.8 GB in 0.27 s instead of 0.88 s on an H100 host), same copy speed after. Best effort."""
    if not sys.platform.startswith("linux") or buffer.numel() < 2**21:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(buffer.numel()), MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def register_host_memory(buffer: torch.Tensor) -> bool:
    """Page-lock ``buffer`` in place. Returns False (and logs why) where no CUDA driver can do it."""
    if not torch.cuda.is_available():
        logger.debug("pin_cpu_memory: no CUDA device, host memory stays pageable")
        return False
    if buffer.numel() == 0:
        return False
    err = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0))
    if err != 0:
        logger.warning(
            "pin_cpu_memory: cudaHostRegister failed (cudaError %d) for %.2f GiB; continuing with pageable "
            "memory, which copies at roughly half the speed. Raise the locked-memory limit (ulimit -l) to fix.",
            err,
            buffer.numel() / 2**30,
        )
        return False
    return True


def unregister_host_memory(buffer: torch.Tensor) -> None:
    err = int(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
    if err != 0:
        logger.warning("cudaHostUnregister failed with cudaError %d", err)

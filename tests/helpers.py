"""Small helpers shared by tests: an observer that interrupts, and a leak-proof RSS reading."""

from __future__ import annotations

import ctypes
import gc
import os


class StopAt:
    """A step observer that raises before step ``at``, as ComfyUI's interrupt does."""

    def __init__(self, at: int):
        self.at = at

    def before_step(self, index: int, total: int) -> None:
        if index == self.at:
            raise KeyboardInterrupt("interrupted by the test")

    def after_step(self, index: int, total: int) -> None:
        pass


def rss_bytes() -> int:
    """Resident memory after returning freed heap pages to the OS: glibc keeps freed activations mapped, which
    makes raw RSS swing by tens of MB between identical runs and would hide (or fake) a real leak."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

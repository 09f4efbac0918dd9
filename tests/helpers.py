"""Small helpers shared by tests: an observer that interrupts, a leak-proof RSS reading, an mp4 tag reader."""

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


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, end) of each ISO-BMFF box in ``data[start:end]``."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind, header = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8].decode("latin1"), 8
        if size == 1:  # a 64-bit size follows the type
            size, header = int.from_bytes(data[i + 8:i + 16], "big"), 16
        elif size == 0:  # to the end of the enclosing box
            size = end - i
        yield kind, i + header, i + size
        i += size


def mp4_tags(data: bytes) -> tuple[list[str], dict[str, str]]:
    """The top-level box order and the ``mdta`` tags of an mp4, read the way ComfyUI's frontend reads them when a
    video is dropped on the canvas (``moov/udta/meta``: ``keys`` names the items, ``ilst`` holds their values)."""
    moov = next((s, e) for k, s, e in _boxes(data) if k == "moov")
    udta = next((s, e) for k, s, e in _boxes(data, *moov) if k == "udta")
    meta = next((s, e) for k, s, e in _boxes(data, *udta) if k == "meta")
    inner = {k: (s, e) for k, s, e in _boxes(data, meta[0] + 4, meta[1])}  # meta has a 4-byte version first
    keys_start, _ = inner["keys"]
    names, i = [], keys_start + 8
    for _ in range(int.from_bytes(data[keys_start + 4:keys_start + 8], "big")):
        size = int.from_bytes(data[i:i + 4], "big")
        names.append(data[i + 8:i + size].decode())  # size, "mdta", name
        i += size
    values = {}
    for kind, start, end in _boxes(data, *inner["ilst"]):
        index = int.from_bytes(kind.encode("latin1"), "big")  # 1-based index into keys
        for data_kind, data_start, data_end in _boxes(data, start, end):
            if data_kind == "data":
                values[names[index - 1]] = data[data_start + 8:data_end].decode()
    return [k for k, _, _ in _boxes(data)], values

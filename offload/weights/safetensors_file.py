"""The one safetensors reader: a header parsed and checked once, tensors read with positional reads.

The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range, then the raw little-endian data. Every loader in the pack (folder checks, layerwise streaming, per-rank
shards) goes through :class:`SafetensorsFile`, so a truncated or corrupt file is named the same way everywhere and
the header is validated before a single tensor byte is trusted.

Reads go straight from the file into the destination's memory with ``os.preadv`` (one copy, from the page cache or
the disk, no intermediate tensor, no memory map that a later rewrite of the file could change under us); several
threads may read one file at once through its single descriptor.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..dtypes import SAFETENSORS_DTYPES
from .files import open_regular

MAX_HEADER_BYTES = 100 * 2**20
"""A real header is a few MB at most (tens of thousands of tensors); anything larger is not a model file."""

_HAS_PREADV = hasattr(os, "preadv")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the first element."""
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def _invalid(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path} is not a valid safetensors file ({why}). Fix: delete it and download it again.")


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check ``path``'s header: every entry's dtype, shape and byte range, and that the file holds every
    byte the header promises (a truncated download is the most common broken model). Reads no tensor data."""
    path = Path(path)
    fd = open_regular(path)  # a FIFO or device is refused here, never waited on
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            header_len = int.from_bytes(raw, "little")
            if not 0 < header_len <= min(size - 8, MAX_HEADER_BYTES):
                # The length itself is not echoed: in a file that is not a model it is 8 bytes of its content.
                raise ValueError(f"its 8-byte header length does not fit in a file of this size (at most {MAX_HEADER_BYTES} bytes)")
            header = json.loads(handle.read(header_len))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({os.strerror(e.errno) if e.errno else type(e).__name__}).") from e
    except UnicodeDecodeError:
        raise _invalid(path, "the header is not UTF-8 JSON") from None
    except (ValueError, RecursionError) as e:
        raise _invalid(path, str(e)[:200]) from e
    finally:
        os.close(fd)
    if not isinstance(header, dict):
        raise _invalid(path, f"the header is a JSON {type(header).__name__}, not an object")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            metadata = meta if isinstance(meta, dict) else {}
            continue
        entry = _entry(path, name, meta, data_start)
        entries[name] = entry
        end = max(end, entry.offset + entry.nbytes)
    if end > size:
        raise ModelLoadError(
            f"{path} is truncated: its header needs {end} bytes but the file has {size}. "
            "Fix: delete it and download it again."
        )
    return entries, metadata


def _entry(path: Path, name: str, meta: Any, data_start: int) -> TensorEntry:
    if not isinstance(meta, dict):
        raise _invalid(path, f"tensor {name[:100]!r} has no dtype/shape/data_offsets object")
    dtype_code, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype_code not in SAFETENSORS_DTYPES:
        raise _invalid(path, f"tensor {name[:100]!r} has dtype {str(dtype_code)[:20]!r}, which this loader does not read")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise _invalid(path, f"tensor {name[:100]!r} has an invalid shape")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _invalid(path, f"tensor {name[:100]!r} has invalid offsets")
    dtype = SAFETENSORS_DTYPES[dtype_code]
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise _invalid(path, f"tensor {name[:100]!r}: byte range of {nbytes} bytes does not match shape {shape}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)


class SafetensorsFile:
    """One open safetensors file. Use as a context manager (or call :meth:`close`); thread-safe reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._fd: int | None = open_regular(self.path) if _HAS_PREADV else None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read_into(self, name: str, dest: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Fill ``dest`` (contiguous, CPU, the file's dtype, the tensor's or the row range's shape) from the file."""
        entry = self.entries[name]
        offset, nbytes = entry.offset, entry.nbytes
        if rows is not None:
            offset += rows[0] * entry.row_bytes
            nbytes = (rows[1] - rows[0]) * entry.row_bytes
        if dest.dtype != entry.dtype or not dest.is_contiguous() or dest.device.type != "cpu":
            raise ValueError(f"{name}: read_into needs a contiguous CPU {entry.dtype} tensor, got {dest.dtype}")
        if dest.numel() * dest.element_size() != nbytes:
            raise ValueError(f"{name}: destination holds {dest.numel() * dest.element_size()} bytes, not {nbytes}")
        self._pread(offset, nbytes, dest.data_ptr())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A new CPU tensor with the tensor's (or its rows') values, in the file's dtype."""
        entry = self.entries[name]
        shape = entry.shape if rows is None else (rows[1] - rows[0], *entry.shape[1:])
        out = torch.empty(shape, dtype=entry.dtype)
        self.read_into(name, out, rows)
        return out

    def _pread(self, offset: int, nbytes: int, address: int) -> None:
        if nbytes == 0:
            return
        view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
        done = 0
        if self._fd is not None:  # positional reads: threads share one descriptor
            while done < nbytes:  # Linux returns at most ~2 GiB per call
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    break
                done += got
        else:  # Windows: a handle per read
            with open(self.path, "rb", buffering=0) as f:
                f.seek(offset)
                while done < nbytes:
                    got = f.readinto(view[done:])
                    if not got:
                        break
                    done += got
        if done < nbytes:
            raise ModelLoadError(
                f"{self.path}: file ends early ({done} of {nbytes} bytes at offset {offset}). "
                "It is truncated or was changed while loading; download it again."
            )

"""Collectives between ranks that carry plain data only, authenticated: the workers' control plane.

``torch.distributed``'s object collectives (``broadcast_object_list``, ``all_gather_object``) pickle and unpickle
whatever they are given, and the process group's connections are not authenticated by PyTorch: whoever gets bytes
into them gets code run. Here a value is encoded as the link encodes it (``torch.save``, decoded with
``weights_only=True``: plain data or an error, never code), sent as a length and a ``uint8`` tensor, and - when the
ranks share the launch's secret - prefixed with an HMAC-SHA256 of the bytes, so a message that did not come from a
rank holding the secret is refused before it is decoded. Lengths are bounded before anything is allocated.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import torch
import torch.distributed as dist

from .protocol import decode_plain, encode_plain

MAX_MESSAGE_BYTES = 2**31 - 1
"""Largest control message (a request carries the initial noise and the conditioning: tens of MB)."""
TAG_BYTES = 32


class ControlPlaneError(RuntimeError):
    """A control message between ranks was forged, truncated or not plain data."""


def _sign(key: bytes | None, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest() + data if key else data


def _open(key: bytes | None, data: bytes, origin: str) -> Any:
    if key:
        tag, data = data[:TAG_BYTES], data[TAG_BYTES:]
        if not hmac.compare_digest(tag, hmac.new(key, data, hashlib.sha256).digest()):
            raise ControlPlaneError(f"a control message from {origin} failed authentication: it was not sent by a "
                                    "rank of this launch")
    try:
        return decode_plain(data)
    except ValueError as e:
        raise ControlPlaneError(f"a control message from {origin} is not plain data: {e}") from e


def _length(n: int, origin: str) -> int:
    if not 0 < n <= MAX_MESSAGE_BYTES + TAG_BYTES:
        raise ControlPlaneError(f"a control message from {origin} announces {n} bytes")
    return n


def broadcast_plain(value: Any, src: int, group: Any = None, key: bytes | None = None) -> Any:
    """``value`` from rank ``src`` (global rank) to every rank of ``group``; other ranks pass anything (None)."""
    mine = dist.get_rank() == src
    if mine:
        data = _sign(key, encode_plain(value))
        length = torch.tensor([len(data)], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(length, src=src, group=group)
    n = _length(int(length.item()), f"rank {src}")
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine else torch.empty(n, dtype=torch.uint8)
    dist.broadcast(buffer, src=src, group=group)
    return value if mine else _open(key, buffer.numpy().tobytes(), f"rank {src}")


def all_gather_plain(value: Any, group: Any = None, key: bytes | None = None) -> list[Any]:
    """Every rank's ``value``, in rank order of ``group``."""
    data = _sign(key, encode_plain(value))
    size = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=group)
    sizes = [_length(int(n.item()), f"rank {i}") for i, n in enumerate(lengths)]
    longest = max(sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    return [_open(key, buffer[:n].numpy().tobytes(), f"rank {i}") for i, (buffer, n) in enumerate(zip(gathered, sizes))]


def control_key(secret: bytes | None) -> bytes | None:
    """The key control messages are signed with, derived from the launch's secret (the secret itself stays the
    link's)."""
    return hmac.new(secret, b"video-offload control plane", hashlib.sha256).digest() if secret else None

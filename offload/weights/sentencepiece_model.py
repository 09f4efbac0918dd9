"""Read a SentencePiece model (the ``.model`` protobuf) without protobuf: the pieces, their scores and types, and
the normaliser's precompiled character map.

ComfyUI keeps the UMT5 tokenizer inside the text encoder's safetensors file, as the raw bytes of a SentencePiece
``ModelProto`` (the uint8 tensor ``spiece_model``). transformers turns such a file into a fast tokenizer with its
``SentencePieceExtractor``, which needs the ``protobuf`` package only to read these few fields; this module reads
them from the wire format directly (``sentencepiece_model.proto``: ``ModelProto.pieces`` = 1 with ``piece`` = 1,
``score`` = 2, ``type`` = 3; ``trainer_spec`` = 2 with ``model_type`` = 3, ``unk_id`` = 40; ``normalizer_spec`` = 3
with ``precompiled_charsmap`` = 2, ``add_dummy_prefix`` = 3, ``remove_extra_whitespaces`` = 4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1


class SentencePieceError(ValueError):
    """The bytes are not a SentencePiece model."""


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: tuple[tuple[str, float, int], ...]
    """``(piece, score, type)`` in id order."""
    model_type: int
    unk_id: int
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise SentencePieceError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """``(field number, wire type, value)`` for each field of one message; length-delimited values are bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise SentencePieceError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise SentencePieceError("truncated message")
        yield number, wire, value


def read_sentencepiece_model(data: bytes) -> SentencePieceModel:
    """Parse the fields a tokenizer needs; raises :class:`SentencePieceError` on anything else."""
    pieces: list[tuple[str, float, int]] = []
    model_type, unk_id = UNIGRAM, 0
    charsmap, dummy_prefix, extra_whitespaces = b"", True, True
    for number, wire, value in _fields(bytes(data)):
        if number == 1 and wire == 2:
            piece, score, kind = "", 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 2 and wire == 2:
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    model_type = v
                elif n == 40 and w == 0:
                    unk_id = v
        elif number == 3 and wire == 2:
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    charsmap = v
                elif n == 3 and w == 0:
                    dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    extra_whitespaces = bool(v)
    if not pieces:
        raise SentencePieceError("no pieces")
    return SentencePieceModel(tuple(pieces), model_type, unk_id, charsmap, dummy_prefix, extra_whitespaces)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def write_sentencepiece_model(pieces: list[tuple[str, float, int]], unk_id: int = 2) -> bytes:
    """The inverse of :func:`read_sentencepiece_model` for a unigram model with an identity normaliser: the bytes
    of a ``.model`` file (sentencepiece itself loads them), for tests and benches that need a tokenizer inside a
    text encoder's file without downloading one."""
    proto = b"".join(
        _field(1, 2, _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind)))
        for piece, score, kind in pieces
    )
    proto += _field(2, 2, _field(3, 0, _varint(UNIGRAM)) + _field(40, 0, _varint(unk_id)))
    proto += _field(3, 2, _field(1, 2, b"identity") + _field(3, 0, b"\x01") + _field(4, 0, b"\x01"))
    return proto

"""The one map between dtype names (options, worker specs, safetensors headers) and torch dtypes.

Options and worker specs travel as plain strings (JSON, widget values); safetensors headers name dtypes with their
own codes. Every translation goes through here, so a dtype the pack accepts in one place it accepts everywhere.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
"""Dtypes a model may be computed in (precision options, worker specs)."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""The safetensors header codes this pack reads."""


def compute_dtype(name: str) -> torch.dtype:
    """``COMPUTE_DTYPES[name]``; a KeyError names the accepted names."""
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a compute dtype; use one of {', '.join(COMPUTE_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The inverse of :func:`compute_dtype`."""
    for name, value in COMPUTE_DTYPES.items():
        if value == dtype:
            return name
    raise KeyError(f"{dtype} is not a compute dtype; use one of {', '.join(COMPUTE_DTYPES)}")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU (Wan's native precision) and float32 on a CPU (where bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return compute_dtype(name)

"""What a block list must look like to stream through shared slots, checked before any memory is taken: one byte
layout for every block, one stored format (fp8 or not) for every block, each tensor owned by one block and still on
the CPU (or the meta device, when a weight source fills it). Errors name the block and the tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .host_memory import FlatLayout
from .stored_format import StoredFormat
from .tensors import TensorRef


def _describe(t: torch.Tensor | None) -> str:
    return "absent" if t is None else f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def stored_formats(blocks_name: str, refs: list[list[TensorRef]], weights: Any) -> list[list[StoredFormat | None]] | None:
    """Each block tensor's stored format (None: kept in its compute dtype), or None when no tensor is narrow.
    The narrow tensors must be the same ones, in the same dtypes, in every block (one stored layout); their
    scales may differ."""
    stored_format = getattr(weights, "stored_format", None)
    if stored_format is None:
        return None
    formats = [
        [stored_format(f"{blocks_name}.{i}.{ref.name}", ref.get()) for ref in block_refs]
        for i, block_refs in enumerate(refs)
    ]
    if not any(f is not None for block in formats for f in block):
        return None

    def shape(f: StoredFormat | None):
        return None if f is None else (f.dtype, f.scale is not None)

    for i, block in enumerate(formats[1:], start=1):
        for ref, first, this in zip(refs[i], formats[0], block):
            if shape(first) != shape(this):
                raise ValueError(
                    f"{blocks_name}.{i}.{ref.name} is stored as {shape(this)} but as {shape(first)} in block "
                    "0: every block must be stored alike to stream through the same slots"
                )
    return formats


def common_layout(blocks_name: str, refs: list[list[TensorRef]]) -> FlatLayout:
    def named(block_refs):
        return [(ref.name, ref.get()) for ref in block_refs]

    reference = named(refs[0])
    layout = FlatLayout.of(reference)
    for i, block_refs in enumerate(refs[1:], start=1):
        current = named(block_refs)
        if layout.matches(current):
            continue
        problem = None
        for (ref_name, ref), (name, t) in zip(reference, current):
            if ref_name != name:
                problem = f"has tensor {name!r} where block 0 has {ref_name!r}"
            elif ref.shape != t.shape or ref.dtype != t.dtype:
                problem = f"tensor {name!r} is {_describe(t)} there but {_describe(ref)} in block 0"
            if problem:
                break
        if problem is None and len(current) > len(reference):
            problem = f"has an extra tensor {current[len(reference)][0]!r}"
        elif problem is None:
            problem = f"lacks tensor {reference[len(current)][0]!r}"
        raise ValueError(
            f"{blocks_name}.{i} is not shaped like {blocks_name}.0: it {problem}. Layerwise offload "
            "streams identically shaped blocks through shared GPU slots; offload this model another way."
        )
    return layout


def check_ownership(model: nn.Module, blocks_name: str, refs: list[list[TensorRef]], has_weights: bool) -> None:
    """Tensors must be on the CPU (or meta when a weight source fills them) and belong to one block only."""
    owner_of: dict[int, int] = {}
    for i, block_refs in enumerate(refs):
        for ref in block_refs:
            t = ref.get()
            if owner_of.setdefault(id(t), i) != i:
                raise ValueError(
                    f"{blocks_name}.{i}.{ref.name} is shared with block {owner_of[id(t)]}: blocks that share "
                    "weights cannot stream through separate slots"
                )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta and not has_weights:
            raise ValueError(
                f"{name} is on the meta device: nothing to copy from. Load real weights first, or build with "
                "weights.streaming.layerwise_from_pretrained(...)"
            )
        if not t.is_meta and t.device.type != "cpu":
            raise ValueError(
                f"{name} is already on {t.device}: the offloader adopts a CPU model (load it without a device, "
                "or call model.to('cpu') first) so the full DiT never has to fit on the GPU"
            )

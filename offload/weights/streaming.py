"""Load a model straight from its safetensors files into layerwise offload (the standalone entry point).

The offload manager does the same through its model source; this function is for using ``LayerwiseOffloader`` on
its own, from a Diffusers-format model folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ..core.layerwise import LayerwiseOffloader
from ..core.spec import find_block_list
from .tensor_source import SafetensorsWeights, build_empty_model, read_model_config


def layerwise_from_pretrained(
    folder: str | Path,
    device: torch.device | str,
    *,
    model_cls: type,
    pin_cpu_memory: bool,
    dtype: torch.dtype | None = torch.bfloat16,
    prefetch_depth: int = 1,
    resident_blocks: int | Literal["auto"] = 0,
    max_pinned_bytes: int | None = None,
    shared_slots=None,
) -> LayerwiseOffloader:
    """Build ``model_cls`` from ``folder`` with its parameters on the meta device, then read each block tensor from
    the files into its place in the host arena and every other tensor into device memory, one tensor at a time:
    the full model is never on the GPU and never twice in host memory. The model is ``offloader.model``.

    ``model_cls`` is explicit: a folder's ``config.json`` is data and never chooses which code to run.
    Tensors get the dtypes ``from_pretrained(dtype=dtype)`` gives them (``_keep_in_fp32_modules`` stay float32).
    ``shared_slots`` (``core.slot_sharing.SharedSlots``): stream through slots shared with another model's offloader.
    """
    folder = Path(folder)
    config = read_model_config(model_cls, folder)
    with SafetensorsWeights.from_folder(folder, dtype, getattr(model_cls, "_keep_in_fp32_modules", None)) as weights:
        model = build_empty_model(model_cls, config, dtype, str(folder))
        return layerwise_from_weights(model, weights, device, pin_cpu_memory=pin_cpu_memory,
                                      prefetch_depth=prefetch_depth, resident_blocks=resident_blocks,
                                      max_pinned_bytes=max_pinned_bytes, shared_slots=shared_slots)


def layerwise_from_weights(model, weights: SafetensorsWeights, device: torch.device | str, **options) -> LayerwiseOffloader:
    """``model`` (built on the meta device) streamed from ``weights`` (a folder's or a single file's, whose fp8
    tensors stay fp8 in the host arena): the shared second half of the entry points."""
    weights.apply_dtypes(model)
    _, blocks = find_block_list(model)
    return LayerwiseOffloader(model, blocks, device, weights=weights, **options)


def layerwise_from_file(
    path: str | Path, fmt, device: torch.device | str, *, model_cls: type, dtype: torch.dtype | None = torch.bfloat16,
    **options,
) -> LayerwiseOffloader:
    """A single file (a ComfyUI ``diffusion_models`` file: bf16, fp16, fp8 or scaled fp8) streamed layer by layer;
    ``fmt`` is the family's format for it (``families.wan.files.WanDitFormat``). fp8 weights stay fp8 in host
    memory and over PCIe and are widened on the device."""
    from .single_files import FilePart

    part = FilePart.open(path, fmt, "dit")
    with part.weights(model_cls, dtype) as weights:
        return layerwise_from_weights(part.empty_model(model_cls, dtype), weights, device, **options)

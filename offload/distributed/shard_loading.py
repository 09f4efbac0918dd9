"""Each rank reads only its own rows of every DiT weight, straight from the safetensors files.

The model is built on the meta device by ``direct_load.build_empty_model`` (the same context managers as
``from_pretrained``, so ``__init__``-computed buffers such as Wan's rope tables are bit-identical), its meta
parameters take ``from_pretrained(dtype=...)``'s dtypes (``SafetensorsWeights.apply_dtypes``: floating tensors in
the target dtype except ``_keep_in_fp32_modules``, which stay float32), FSDP2 shards it (still on meta), and only
then does memory appear: ``to_empty`` allocates each rank's local shards, and each one is filled from a row slice of
the file. Nothing ever holds the whole model, on any rank.

FSDP2 shards every parameter along dim 0 the way ``torch.chunk`` does: with ``n`` rows over ``N`` ranks, rank ``r``
holds rows ``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / N)`` (the last ranks may hold fewer, even none). The
local shapes FSDP reports are checked against that rule, so a change in FSDP's layout fails loudly here instead of
loading the wrong rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..direct_load import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, SafetensorsWeights, build_empty_model
from ..errors import ModelLoadError

logger = logging.getLogger(__name__)


def build_meta_wan(folder: Path, dtype: torch.dtype) -> nn.Module:
    """A ``WanTransformer3DModel`` with parameters on meta in their final dtypes, buffers computed on the CPU."""
    from diffusers import WanTransformer3DModel

    config_path = folder / "config.json"
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_path}: unreadable ({e}). Fix: re-download the transformer folder.") from e
    if class_name != WanTransformer3DModel.__name__:
        raise ModelLoadError(
            f"{config_path} describes a {class_name!r}; the worker group runs WanTransformer3DModel. "
            "Fix: point at the transformer/ folder of a Wan2.1 Diffusers model."
        )
    model = build_empty_model(WanTransformer3DModel, folder, dtype)
    with SafetensorsWeights(folder, dtype, WanTransformer3DModel._keep_in_fp32_modules) as weights:
        weights.apply_dtypes(model)  # also refuses missing or mis-shaped tensors, naming them
    return model.requires_grad_(False)


def shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The dim-0 row range FSDP2's ``Shard(0)`` gives ``rank`` of ``world_size`` (``torch.chunk`` semantics)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


class RowReader:
    """Row slices of tensors in a Diffusers safetensors folder (one file or an index of shards), memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / WEIGHTS_INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [WEIGHTS_NAME]
        self._stack = contextlib.ExitStack()
        self._file_of: dict[str, object] = {}
        from safetensors import safe_open

        for name in files:
            try:
                handle = self._stack.enter_context(safe_open(str(folder / name), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types for unreadable files
                self._stack.close()
                raise ModelLoadError(f"{folder / name}: cannot open ({e}). Fix: re-download the model.") from e
            for key in handle.keys():
                self._file_of[key] = handle

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` (the whole tensor when both are None), in the file's dtype."""
        handle = self._file_of[name]
        if start is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[start:stop]


def materialize_shards(model: nn.Module, folder: Path, device: torch.device, shard_rank: int, shard_world: int,
                       params_on_cpu: bool) -> None:
    """Allocate this rank's shards (on ``device``, or host memory with FSDP CPU offload) and read them from disk.

    Buffers computed by ``__init__`` (not stored in the files) are kept and moved to ``device``, the compute device,
    where FSDP's CPU offload also expects them.
    """
    from torch.distributed.tensor import DTensor

    computed = {name: buffer for name, buffer in model.named_buffers() if not buffer.is_meta}
    model.to_empty(device=torch.device("cpu") if params_on_cpu else device)
    with RowReader(folder) as reader, torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                local = param.to_local()
                start, stop = shard_rows(param.shape[0], shard_rank, shard_world)
                if local.shape[0] != stop - start:
                    raise ModelLoadError(
                        f"{name}: FSDP gave rank {shard_rank} {local.shape[0]} rows of {param.shape[0]}, expected "
                        f"rows {start}..{stop}. This PyTorch's FSDP2 shards differently than the loader assumes; "
                        "report it with the PyTorch version."
                    )
                rows = reader.read(name, start, stop)
            else:
                local, rows = param, reader.read(name)
            local.copy_(rows.to(local.dtype))
        for name, buffer in model.named_buffers():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if name in computed:
                owner._buffers[leaf] = computed[name].to(device)
            elif name in reader:
                owner._buffers[leaf] = reader.read(name).to(device=device, dtype=buffer.dtype)
            else:
                raise ModelLoadError(f"{folder}: buffer {name} is neither computed by the model nor in the files")
    logger.debug("rank %d of %d: read its shard of %s", shard_rank, shard_world, folder)


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights this rank holds (its shards plus buffers), wherever they live."""
    from torch.distributed.tensor import DTensor

    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def unsharded_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters when gathered (what one FSDP unit costs while it runs)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


"""Each rank reads only its own rows of every DiT weight, straight from the safetensors files.

The model is built on the meta device by the source's ``empty_model`` (``weights.build_empty_model``: the same
context managers as ``from_pretrained``, so ``__init__``-computed buffers such as Wan's rope tables are
bit-identical), its meta parameters take ``from_pretrained(dtype=...)``'s dtypes (``SafetensorsWeights.apply_dtypes``:
floating tensors in the target dtype except ``_keep_in_fp32_modules``, which stay float32), FSDP2 shards it (still
on meta), and only then does memory appear: ``to_empty`` allocates each rank's local shards, and each one is filled
from a row slice of the file. Nothing ever holds the whole model, on any rank.

FSDP2 shards every parameter along dim 0 the way ``torch.chunk`` does: with ``n`` rows over ``N`` ranks, rank ``r``
holds rows ``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / N)`` (the last ranks may hold fewer, even none). The
local shapes FSDP reports are checked against that rule, so a change in FSDP's layout fails loudly here instead of
loading the wrong rows.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..core.tensors import rebind_named
from ..errors import ModelLoadError
from ..weights.tensor_source import SafetensorsWeights

logger = logging.getLogger(__name__)


def shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The dim-0 row range FSDP2's ``Shard(0)`` gives ``rank`` of ``world_size`` (``torch.chunk`` semantics)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def materialize_shards(model: nn.Module, weights: SafetensorsWeights, device: torch.device, shard_rank: int,
                       shard_world: int, params_on_cpu: bool) -> None:
    """Allocate this rank's shards (on ``device``, or host memory with FSDP CPU offload) and read them from disk.

    Buffers computed by ``__init__`` (not stored in the files) are kept and moved to ``device``, the compute device,
    where FSDP's CPU offload also expects them.
    """
    from torch.distributed.tensor import DTensor

    computed = {name: buffer for name, buffer in model.named_buffers() if not buffer.is_meta}
    model.to_empty(device=torch.device("cpu") if params_on_cpu else device)
    with torch.no_grad():
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
                rows = weights.read_rows(name, (start, stop))
            else:
                local, rows = param, weights.read_rows(name, None)
            local.copy_(rows.to(local.dtype))
        for name, buffer in list(model.named_buffers()):
            if name in computed:
                rebind_named(model, name, computed[name].to(device))
            elif name in weights:
                rebind_named(model, name, weights.read_rows(name, None).to(device=device, dtype=buffer.dtype))
            else:
                raise ModelLoadError(f"{weights.describe}: buffer {name} is neither computed by the model nor in the files")
    logger.debug("rank %d of %d: read its shard of %s", shard_rank, shard_world, weights.describe)


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

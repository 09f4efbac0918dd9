"""The Wan DiT's parallel plan: the generic FSDP/CFG/Ulysses pieces, ordered for Wan (torchtitan's shape)."""

from __future__ import annotations

import torch
from torch import nn

from ...distributed.fsdp import Parallelism, ParallelPlan, parallelize


def parallelize_wan(model: nn.Module, plan: ParallelPlan, device: torch.device, *, cpu_offload: bool, pin_memory: bool) -> Parallelism:
    """Ulysses through ``_cp_plan`` (when the plan splits the sequence), FSDP2 per block, and the condition embedder
    (~0.2B parameters on 14B, run once before the blocks) as a unit of its own, so it is freed before the first
    block instead of staying gathered with the root for the whole forward."""
    return parallelize(model, plan, device, cpu_offload=cpu_offload, pin_memory=pin_memory,
                       extra_units=[model.condition_embedder])

"""How a DiT is spread over the worker group: FSDP2 for memory, CFG and Ulysses parallelism for speed.

The generic pieces; a family's ``parallelize_<model>`` (e.g. ``families/wan/parallelize.py``) only orders them.

The mesh. ``world = cfg x sp``:

- **FSDP** shards every weight over *all* ranks (a 1-D mesh of the whole world), so each GPU holds 1/world of the
  DiT. Each block is an FSDP unit, gathered just before it runs and resharded right after; the next block's gather
  is prefetched while the current one computes.
- **CFG parallel** (``cfg=2``): ranks with cfg coordinate 0 run the conditional pass, those with 1 the
  unconditional pass, at the same time; the two predictions are all-gathered and combined identically on every
  rank. FSDP's gathers span both halves, which is fine because every rank runs exactly one forward per step: the
  collectives stay in lockstep. With guidance off, both halves run the conditional pass - a half with no forward
  would leave the other hanging in FSDP's all-gathers.
- **Sequence parallel** (Ulysses, ``sp`` ranks per CFG branch): diffusers' context-parallel hooks split the video
  tokens over the ``sp`` ranks after the rope/patch embedding, attention swaps the split from tokens to heads with
  an all-to-all (so each rank attends over the whole sequence for ``heads/sp`` heads), and ``proj_out`` gathers
  the tokens back. Cross-attention needs no exchange (the text is small and every rank has all of it).

``auto`` picks ``cfg=2`` when the world is even and gives the rest to Ulysses (2 GPUs: CFG only; 4: CFG x 2).
``ulysses`` uses all ranks for the sequence; ``none`` only shards memory (every rank computes the whole step: the
FastVideo-style baseline the bench compares against).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.denoise import BranchPredictor
from ..core.spec import find_block_list
from ..errors import ConfigError
from .protocol import PARALLEL_MODES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelPlan:
    """How the world's ranks share the compute of one denoising step."""

    world_size: int
    cfg: int
    """1, or 2: the conditional and unconditional passes run on different halves of the world."""
    sp: int
    """Ranks that split one pass's video tokens (Ulysses); 1 means no sequence split."""

    @classmethod
    def choose(cls, world_size: int, mode: str) -> ParallelPlan:
        if mode not in PARALLEL_MODES:
            raise ConfigError("parallel", mode, "is not a parallel mode", f"use one of {', '.join(PARALLEL_MODES)}")
        if mode == "none" or world_size == 1:
            return cls(world_size, 1, 1)
        if mode == "ulysses":
            return cls(world_size, 1, world_size)
        cfg = 2 if world_size % 2 == 0 else 1
        return cls(world_size, cfg, world_size // cfg)

    def check_model(self, num_heads: int) -> None:
        """Ulysses gives each rank ``heads / sp`` whole heads."""
        if self.sp > 1 and num_heads % self.sp:
            raise ConfigError(
                "num_gpus", self.world_size,
                f"splits each attention over {self.sp} GPUs, which does not divide the model's {num_heads} heads",
                f"use a num_gpus whose sequence-parallel part ({'half of ' if self.cfg == 2 else ''}num_gpus) "
                f"divides {num_heads}",
            )

    def check_video(self, tokens: int, describe: str, fix: str) -> None:
        """Ulysses splits the video's tokens evenly over ``sp`` ranks (diffusers' even split; its uneven mode
        needs collectives of unequal sizes, which gloo lacks and which the pack does not test on NCCL)."""
        if self.sp > 1 and tokens % self.sp:
            raise ConfigError(
                "size", describe,
                f"gives {tokens} video tokens, which do not split evenly over {self.sp} sequence-parallel GPUs", fix,
            )

    @property
    def splits_compute(self) -> bool:
        return self.cfg * self.sp > 1

    def describe(self) -> str:
        if not self.splits_compute:
            return f"FSDP over {self.world_size} ranks, every rank computes the whole step"
        parts = []
        if self.cfg > 1:
            parts.append("CFG split in 2")
        if self.sp > 1:
            parts.append(f"Ulysses sequence parallel over {self.sp}")
        return f"FSDP over {self.world_size} ranks; " + " x ".join(parts)


@dataclass
class Parallelism:
    """What a family's ``parallelize`` set up, kept for the noise prediction."""

    plan: ParallelPlan
    fsdp_mesh: Any
    compute_mesh: Any | None
    cfg_group: Any | None
    cfg_rank: int
    cp_config: Any | None
    """diffusers' ``ContextParallelConfig`` when sp > 1."""


def build_meshes(plan: ParallelPlan, device_type: str) -> tuple[Any, Any | None]:
    """A 1-D FSDP mesh over the world and, when the compute is split, a (cfg, ring, ulysses) mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    fsdp_mesh = init_device_mesh(device_type, (plan.world_size,), mesh_dim_names=("fsdp",))
    compute_mesh = None
    if plan.splits_compute:
        # diffusers' context parallel wants "ring" and "ulysses" dimensions; ring attention is not used (size 1).
        # Row-major: the ranks of one Ulysses group are consecutive (same host, fastest links).
        compute_mesh = init_device_mesh(
            device_type, (plan.cfg, 1, plan.sp), mesh_dim_names=("cfg", "ring", "ulysses")
        )
    return fsdp_mesh, compute_mesh


def apply_fsdp(model: nn.Module, mesh: Any, *, cpu_offload: bool, pin_memory: bool, extra_units: list[nn.Module] = ()) -> None:
    """FSDP2 per repeated block (``_repeated_blocks``), on each of ``extra_units``, then the root; each unit
    prefetches the next one's gather.

    No ``MixedPrecisionPolicy``: the weights are already in the dtypes ``from_pretrained`` gives them (float32 for
    ``_keep_in_fp32_modules``), and compute must stay in those dtypes to match the single-process model.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    _, block_list = find_block_list(model)
    blocks = list(block_list)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    # Units that run once before the blocks (an embedder) as their own unit are freed before the first block
    # instead of staying gathered with the root for the whole forward.
    for unit in extra_units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    # Explicit forward prefetch: issue the next unit's all-gather (and with CPU offload its host-to-device copy)
    # before this unit's compute, so communication overlaps compute. Costs one extra gathered block at a time.
    for unit in extra_units:
        unit.set_modules_to_forward_prefetch(blocks[:1])
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])


def shard_placement(model: nn.Module) -> dict[str, Any]:
    """Where this rank's shards live and under which FSDP offload policy (the placement the workers report)."""
    from torch.distributed.tensor import DTensor

    devices = sorted({(p.to_local() if isinstance(p, DTensor) else p).device.type for p in model.parameters()})
    _, blocks = find_block_list(model)
    state = blocks[0]._get_fsdp_state()
    group = state._fsdp_param_group
    policy = type(group.offload_policy).__name__ if group is not None else "none"
    pinned = False
    if group is not None and group.fsdp_params:
        local = group.fsdp_params[0].sharded_param.to_local()
        pinned = bool(local.is_pinned()) if local.device.type == "cpu" else False
    return {"shard_devices": devices, "offload_policy": policy, "pinned": pinned}


def apply_sequence_parallel(model: nn.Module, compute_mesh: Any, rank: int, world_size: int, device: torch.device) -> Any:
    """Ulysses over the mesh's "ulysses" dimension with diffusers' context-parallel hooks and the model's ``_cp_plan``.

    This is what ``ModelMixin.enable_parallelism`` does, minus its device lookup (``rank % accelerator count``, a
    division by zero on CPU-only machines, where the CI runs this path with gloo) - it records the config on the
    attention processors, then installs the split/gather hooks named by the model's own ``_cp_plan``.
    """
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend, _ = _AttentionBackendRegistry.get_active_backend()
    if not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise ConfigError(
            "attention backend", backend.value, "does not support sequence parallelism in diffusers",
            "unset DIFFUSERS_ATTN_BACKEND (the native backend supports it), or use parallel='none'",
        )
    cp_config = ContextParallelConfig(ulysses_degree=compute_mesh["ulysses"].size(), mesh=compute_mesh)
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(rank, world_size, device, mesh=compute_mesh)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    model._parallel_config = config
    apply_context_parallel(model, cp_config, model._cp_plan)
    return cp_config


def parallelize(
    model: nn.Module, plan: ParallelPlan, device: torch.device, *, cpu_offload: bool, pin_memory: bool,
    extra_units: list[nn.Module] = (),
) -> Parallelism:
    """Apply the plan to a meta-device DiT (weights are loaded after, into the shards): Ulysses through the model's
    ``_cp_plan`` when the plan splits the sequence, then FSDP. Everything happens before ``to_empty``: the sequence
    split hooks wrap ``forward`` and FSDP uses module hooks, so the two compose either way."""
    rank = dist.get_rank()
    fsdp_mesh, compute_mesh = build_meshes(plan, device.type)
    cp_config = None
    if plan.sp > 1:
        cp_config = apply_sequence_parallel(model, compute_mesh, rank, plan.world_size, device)
    apply_fsdp(model, fsdp_mesh, cpu_offload=cpu_offload, pin_memory=pin_memory, extra_units=extra_units)
    cfg_group, cfg_rank = None, 0
    if plan.cfg > 1:
        cfg_group, cfg_rank = compute_mesh["cfg"].get_group(), compute_mesh["cfg"].get_local_rank()
    return Parallelism(plan, fsdp_mesh, compute_mesh, cfg_group, cfg_rank, cp_config)


def cfg_parallel_prediction(
    predictor: BranchPredictor, latents: torch.Tensor, timestep: torch.Tensor, scale: float, parallelism: Parallelism,
    guided: bool | None = None,
) -> torch.Tensor:
    """Classifier-free guidance with the two branches on the two halves of the mesh's cfg dimension.

    The guided prediction is computed with exactly the single-process expression, in the model's dtype, from the
    two gathered predictions, so every rank holds the same tensor and steps its scheduler identically. With
    guidance off, both halves run the conditional pass: a half with no forward would leave the other hanging in
    FSDP's all-gathers.
    """
    from ..core.denoise import guided_prediction

    guided = (scale > 1.0 if guided is None else guided) and predictor.has_uncond
    if not (guided and parallelism.plan.cfg == 2):
        return guided_prediction(predictor, latents, timestep, scale, guided)
    mine = predictor(latents, timestep, "cond" if parallelism.cfg_rank == 0 else "uncond").contiguous()
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine, group=parallelism.cfg_group)
    noise_pred, noise_uncond = both
    return noise_uncond + scale * (noise_pred - noise_uncond)

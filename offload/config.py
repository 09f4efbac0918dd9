"""Frozen, validated configuration: the offload options and the generation parameters.

The seven offload options keep FastVideo's names, defaults and meanings exactly (``shared/seed-offloading.txt``),
so its examples run here with only the import changed. Everything is checked at construction, before a single
weight is read: a bad value fails in milliseconds with a message naming the field, the value and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from .errors import ConfigError

SINGLE_GPU_ORDER = (
    "dit_layerwise_offload",
    "image_encoder_cpu_offload",
    "vae_cpu_offload",
    "text_encoder_cpu_offload",
)
"""The seed's recommended order on one GPU: what to turn on next when memory runs out."""

MULTI_GPU_ORDER = (
    "use_fsdp_inference",
    "text_encoder_cpu_offload",
    "image_encoder_cpu_offload",
    "vae_cpu_offload",
    "dit_cpu_offload",
)
"""The seed's recommended order on several GPUs."""


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be True or False", f"pass {name}=True or {name}=False")


def _require_int(name: str, value: Any, low: int, high: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, f"must be a whole number from {low} to {high}", fix)
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be from {low} to {high}", fix)


def _require_float(name: str, value: Any, low: float, high: float, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, value, f"must be a finite number from {low} to {high}", fix)
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be from {low} to {high}", fix)


@dataclass(frozen=True)
class OffloadConfig:
    """Where the weights of each model live and how they move. Defaults are FastVideo's."""

    num_gpus: int = 1
    """GPUs to use. More than one needs ``use_fsdp_inference``."""
    use_fsdp_inference: bool = False
    """Shard the DiT's weights over ``num_gpus`` GPUs with FSDP; each layer is gathered just before it runs."""
    dit_cpu_offload: bool = True
    """With FSDP only: shards live in host memory and move to the GPU per layer. Without FSDP it has no effect."""
    dit_layerwise_offload: bool = True
    """One GPU: DiT blocks live in host memory; the next block's copy overlaps the current block's compute."""
    text_encoder_cpu_offload: bool = True
    """Text encoder weights stay on the CPU and the prompt is encoded there (slow, but rarely the bottleneck)."""
    image_encoder_cpu_offload: bool = True
    """Image encoder weights stay in host memory; copied to the GPU for the encode, dropped after."""
    vae_cpu_offload: bool = True
    """VAE weights stay in host memory; copied to the GPU for the decode, dropped after."""
    pin_cpu_memory: bool = True
    """Page-lock host copies so host-to-GPU copies run at full PCIe speed and asynchronously."""
    prefetch_depth: int = 1
    """Layerwise only: how many blocks ahead of the running one are copied in. 1 hides PCIe on large clips."""
    resident_blocks: int | Literal["auto"] = 0
    """Layerwise only: DiT blocks kept on the GPU for the whole run (the rest stream). ``"auto"`` keeps as many as
    free memory allows after measuring what one denoising step needs; 0 streams every block (FastVideo's)."""
    auto_offload: bool = False
    """Ignore the seven options and walk the recommended order by itself: start resident (or plain FSDP on
    several GPUs) and turn on the next option whenever a stage runs out of memory, logging each choice."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "bool":
                _require_bool(f.name, getattr(self, f.name))
        _require_int("num_gpus", self.num_gpus, 1, 64, "use 1 for one GPU, or the number of GPUs to shard over")
        _require_int("prefetch_depth", self.prefetch_depth, 1, 8, "use 1 (the default) or 2 on slow PCIe links")
        if self.resident_blocks != "auto":
            _require_int(
                "resident_blocks",
                self.resident_blocks,
                0,
                10_000,
                'use 0 to stream every block, a block count, or "auto"',
            )
        if self.auto_offload:
            return  # the seven options are chosen by the auto walk, so their combination is not the user's
        if self.use_fsdp_inference and self.dit_layerwise_offload:
            raise ConfigError(
                "dit_layerwise_offload",
                True,
                "layerwise offload is for one GPU and is not compatible with use_fsdp_inference=True",
                "set dit_layerwise_offload=False (FSDP shards the DiT instead; if memory still runs out, "
                "enable text/image encoder and VAE offload, then dit_cpu_offload=True)",
            )
        if self.use_fsdp_inference and self.num_gpus < 2:
            raise ConfigError(
                "use_fsdp_inference",
                True,
                "FSDP shards weights over several GPUs but num_gpus=1",
                "set num_gpus to 2 or more, or use dit_layerwise_offload=True on a single GPU",
            )
        if self.num_gpus > 1 and not self.use_fsdp_inference:
            raise ConfigError(
                "num_gpus",
                self.num_gpus,
                "several GPUs are used through FSDP, which is off",
                "set use_fsdp_inference=True and dit_layerwise_offload=False, or num_gpus=1",
            )

    @property
    def distributed(self) -> bool:
        return self.use_fsdp_inference and self.num_gpus > 1 and not self.auto_offload

    def next_option_to_enable(self) -> str | None:
        """The first option of the seed's recommended order that is still off, or None when all are on."""
        order = MULTI_GPU_ORDER if self.num_gpus > 1 else SINGLE_GPU_ORDER
        for name in order:
            if not getattr(self, name):
                return name
        return None


def validate_prompt(name: str, value: object, allow_empty: bool = False) -> str:
    """Prompts are plain text; an empty positive prompt is almost always a wiring mistake in a graph."""
    if not isinstance(value, str):
        raise ConfigError(name, value, "must be text", f"pass {name} as a string")
    if not allow_empty and not value.strip():
        raise ConfigError(name, value, "is empty", "describe the video you want")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """One video's size, schedule and seed. Checked against the model's own limits again once it is known."""

    height: int = 480
    """Pixels; a multiple of 16 (VAE downsampling 8 x DiT patch 2)."""
    width: int = 832
    """Pixels; a multiple of 16."""
    num_frames: int = 81
    """Of the form 4k+1 (the VAE compresses time by 4 after the first frame)."""
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    """Classifier-free guidance; at 1.0 or below the negative prompt is not used (diffusers' rule)."""
    flow_shift: float | None = None
    """Noise-schedule shift; None keeps the model folder's value (3.0 suits 480p, 5.0 suits 720p)."""
    seed: int = 0
    """Initial noise comes from a CPU generator seeded with this, so a seed is the same video on any device."""

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            _require_int(name, value, 16, 8192, f"use a multiple of 16 such as {480 if name == 'height' else 832}")
            if value % 16:
                raise ConfigError(
                    name, value, "must be a multiple of 16", f"use {value // 16 * 16 or 16} or {value // 16 * 16 + 16}"
                )
        _require_int("num_frames", self.num_frames, 1, 4093, "use 4k+1 frames such as 17, 33, 49 or 81")
        if self.num_frames % 4 != 1:
            lower = (self.num_frames - 1) // 4 * 4 + 1
            raise ConfigError(
                "num_frames", self.num_frames, "must be of the form 4k+1", f"use {lower} or {lower + 4}"
            )
        _require_int("num_inference_steps", self.num_inference_steps, 1, 1000, "use 20-50 steps (at least 1)")
        _require_float("guidance_scale", self.guidance_scale, 0.0, 100.0, "use 5.0 (the default), or 1.0 to disable")
        if self.flow_shift is not None:
            _require_float("flow_shift", self.flow_shift, 0.01, 100.0, "use 3.0 for 480p or 5.0 for 720p")
        _require_int("seed", self.seed, 0, 2**64 - 1, "use a whole number from 0 to 2**64-1")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def num_latent_frames(self) -> int:
        return (self.num_frames - 1) // 4 + 1

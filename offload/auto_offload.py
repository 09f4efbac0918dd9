"""The ``auto`` choice: walk the seed's recommended order by itself, one step per out-of-memory error.

It starts from the fastest placement (everything resident on one GPU; FSDP with nothing offloaded on several)
and, whenever a stage runs out of memory, turns on the next option of the recommended order, releases what is
on the device, and retries that stage. The level reached is remembered per model, so later runs start there.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import OffloadConfig

logger = logging.getLogger(__name__)

_OFF = dict(
    dit_layerwise_offload=False,
    image_encoder_cpu_offload=False,
    vae_cpu_offload=False,
    text_encoder_cpu_offload=False,
    dit_cpu_offload=False,
)

SINGLE_GPU_LEVELS: tuple[dict[str, bool], ...] = (
    {},
    {"dit_layerwise_offload": True},
    {"dit_layerwise_offload": True, "image_encoder_cpu_offload": True, "vae_cpu_offload": True},
    {
        "dit_layerwise_offload": True,
        "image_encoder_cpu_offload": True,
        "vae_cpu_offload": True,
        "text_encoder_cpu_offload": True,
    },
)
"""One GPU: resident -> layerwise -> + image encoder and VAE offload -> + text encoder offload."""

MULTI_GPU_LEVELS: tuple[dict[str, bool], ...] = (
    {},
    {"text_encoder_cpu_offload": True, "image_encoder_cpu_offload": True, "vae_cpu_offload": True},
    {"text_encoder_cpu_offload": True, "image_encoder_cpu_offload": True, "vae_cpu_offload": True, "dit_cpu_offload": True},
)
"""Several GPUs: FSDP -> + encoders and VAE offload -> + DiT CPU offload."""


def levels_for(config: OffloadConfig) -> tuple[dict[str, bool], ...]:
    return MULTI_GPU_LEVELS if config.num_gpus > 1 else SINGLE_GPU_LEVELS


def config_at_level(config: OffloadConfig, level: int) -> OffloadConfig:
    """The concrete options ``auto`` uses at ``level`` (pin, prefetch and residency are kept from ``config``)."""
    options = {**_OFF, **levels_for(config)[level]}
    if config.num_gpus > 1:
        options["use_fsdp_inference"] = True
    return dataclasses.replace(config, auto_offload=False, **options)


def describe(options: dict[str, bool]) -> str:
    on = [name for name, value in options.items() if value]
    return ", ".join(on) if on else "everything resident"

"""The ComfyUI boundary for latents: the pack's nodes speak ComfyUI's ``LATENT`` exactly.

ComfyUI's ``LATENT`` is ``{"samples": tensor}`` in the model's *raw* VAE space: what its VAE Encode produces,
what KSampler returns (``latent_format.process_out`` undoes the per-channel normalisation after sampling) and what
its VAE Decode consumes. The pack's engine samples in the DiT's normalised space (diffusers' convention), so the
Sample node converts on the way out and Decode VAE on the way in - nowhere else. A pack LATENT therefore decodes
correctly in a native VAE Decode, and a KSampler's LATENT in the pack's Decode VAE.
"""

from __future__ import annotations

from typing import Any

import torch

from ..offload.core.loaded_model import LoadedModel
from ..offload.errors import ConfigError
from ..offload.pipeline.stages import latent_space


def to_comfy_latent(model: LoadedModel, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
    """The engine's normalised latents -> a ComfyUI LATENT (raw VAE space, float32 on the CPU)."""
    return {"samples": latent_space(model).to_raw(normalised.float()).cpu()}


def from_comfy_latent(model: LoadedModel, latent: Any) -> torch.Tensor:
    """A ComfyUI LATENT (raw VAE space) -> the engine's normalised latents; refuses what is not one video."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ConfigError("latent", type(latent).__name__, "is not a LATENT", "connect the Sample node's output")
    samples = latent["samples"]
    space = latent_space(model)
    space.check_latents(samples, "latent", "connect the Sample node's LATENT (or a video VAE Encode's)")
    return space.from_raw(samples.float())

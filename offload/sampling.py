"""The denoising loop: initial noise, scheduler steps, classifier-free guidance.

Step for step what diffusers' ``WanPipeline.__call__`` does, so the same seed gives the same video. Where the DiT
runs (resident, streamed layer by layer, or sharded over a worker group) is hidden behind a ``NoisePredictor``;
this module only orders the steps and gives the host a chance to report progress and stop between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .config import SamplingParams


@dataclass(frozen=True)
class Conditioning:
    """Everything the DiT is conditioned on besides the noisy latents. Tensors live on the CPU between nodes."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor | None = None
    """CLIP image features (image-to-video only)."""
    image: Any = None
    """The start image (PIL, image-to-video only). Its VAE latents depend on the video's size, so they are made
    when sampling, into ``image_condition``."""
    image_condition: torch.Tensor | None = None
    """Mask + VAE latents of the first frame, concatenated to the noisy latents (image-to-video only)."""


class NoisePredictor(Protocol):
    """Runs the DiT for one denoising step and returns the guided noise prediction (float32-compatible)."""

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, guidance_scale: float) -> torch.Tensor: ...


def initial_noise(params: SamplingParams, latent_channels: int, vae_scale_temporal: int = 4, vae_scale_spatial: int = 8) -> torch.Tensor:
    """The starting latents, drawn on the CPU from ``seed`` exactly as diffusers' ``randn_tensor`` draws them."""
    shape = (
        1,
        latent_channels,
        (params.num_frames - 1) // vae_scale_temporal + 1,
        params.height // vae_scale_spatial,
        params.width // vae_scale_spatial,
    )
    generator = torch.Generator("cpu").manual_seed(params.seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class StepObserver(Protocol):
    def before_step(self, index: int, total: int) -> None:
        """Called before each step; raise (e.g. an interrupt) to stop cleanly."""

    def after_step(self, index: int, total: int) -> None:
        """Called after each step, e.g. to advance a progress bar."""


@torch.no_grad()
def denoise(
    predictor: NoisePredictor,
    scheduler: Any,
    params: SamplingParams,
    noise: torch.Tensor,
    device: torch.device,
    observer: StepObserver | None = None,
) -> torch.Tensor:
    """Run ``params.num_inference_steps`` scheduler steps from ``noise``; return the final latents on the CPU."""
    scheduler.set_timesteps(params.num_inference_steps, device=device)
    scheduler.set_begin_index(0)
    latents = noise.to(device)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    for index, t in enumerate(timesteps):
        if observer is not None:
            observer.before_step(index, total)
        noise_pred = predictor(latents, t.expand(latents.shape[0]), params.guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if observer is not None:
            observer.after_step(index, total)
    return latents.to("cpu")


class DiTNoisePredictor:
    """Runs a ``WanTransformer3DModel`` in this process: conditional pass, then unconditional pass when guiding.

    The two passes stay separate (as in diffusers) rather than batched, so numbers match the reference and the
    activation peak stays that of a batch of one - the point of this pack is to fit small GPUs.
    """

    def __init__(self, transformer: torch.nn.Module, conditioning: Conditioning, device: torch.device, dtype: torch.dtype):
        self.transformer = transformer
        self.dtype = dtype
        self.cond = conditioning.prompt_embeds.to(device=device, dtype=dtype)
        negative = conditioning.negative_prompt_embeds
        self.uncond = None if negative is None else negative.to(device=device, dtype=dtype)
        self.image_embeds = None
        if conditioning.image_embeds is not None:
            self.image_embeds = conditioning.image_embeds.to(device=device, dtype=dtype)
        self.image_condition = None
        if conditioning.image_condition is not None:
            self.image_condition = conditioning.image_condition.to(device=device, dtype=dtype)

    def _forward(self, latent_input: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.transformer(
            hidden_states=latent_input,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_image=self.image_embeds,
            return_dict=False,
        )[0]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        latent_input = latents.to(self.dtype)
        if self.image_condition is not None:
            latent_input = torch.cat([latent_input, self.image_condition], dim=1)
        noise_pred = self._forward(latent_input, timestep, self.cond)
        if guidance_scale > 1.0 and self.uncond is not None:
            noise_uncond = self._forward(latent_input, timestep, self.uncond)
            noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
        return noise_pred


"""The three stages of a Wan2.1 generation - encode, sample, decode - each run through the offload manager.

The ComfyUI nodes call these one per node; ``VideoGenerator`` calls all three. Each stage asks the manager for
the component it needs, so the placement rules live in one place.
"""

from __future__ import annotations

import logging

import torch

from .config import OffloadConfig, SamplingParams, validate_prompt
from .errors import ConfigError
from .loading import make_scheduler
from .manager import LoadedWan, OffloadManager
from .sampling import Conditioning, DiTNoisePredictor, StepObserver, denoise, initial_noise
from .text_encoding import encode_prompt

logger = logging.getLogger(__name__)


def encode_prompts(
    manager: OffloadManager, model: LoadedWan, config: OffloadConfig, prompt: str, negative_prompt: str = ""
) -> Conditioning:
    """Encode the prompt and the negative prompt; the embeddings come back on the CPU."""
    validate_prompt("prompt", prompt)
    validate_prompt("negative_prompt", negative_prompt, allow_empty=True)
    tokenizer = manager.tokenizer(model)
    with manager.encoder_in_use(model, "text_encoder", config.text_encoder_cpu_offload, config) as (encoder, device):
        positive = encode_prompt(tokenizer, encoder, prompt, device).cpu()
        negative = encode_prompt(tokenizer, encoder, negative_prompt, device).cpu()
    return Conditioning(prompt_embeds=positive, negative_prompt_embeds=negative)


def check_params_for_model(model: LoadedWan, params: SamplingParams) -> None:
    """Refuse sizes the model cannot represent (its rotary tables end at ``rope_max_seq_len`` per axis)."""
    config = model.folder.read_config("transformer")
    limit = int(config.get("rope_max_seq_len", 1024))
    p_t, p_h, p_w = config.get("patch_size", (1, 2, 2))
    checks = (
        ("num_frames", params.num_frames, params.num_latent_frames // p_t, 4 * limit * p_t - 3),
        ("height", params.height, params.height // 8 // p_h, limit * p_h * 8),
        ("width", params.width, params.width // 8 // p_w, limit * p_w * 8),
    )
    for name, value, positions, maximum in checks:
        if positions > limit:
            raise ConfigError(
                name, value, f"is larger than this model supports ({maximum})", f"use {name} <= {maximum}"
            )


def sample_latents(
    manager: OffloadManager,
    model: LoadedWan,
    config: OffloadConfig,
    conditioning: Conditioning,
    params: SamplingParams,
    observer: StepObserver | None = None,
) -> torch.Tensor:
    """Denoise from the seed's noise; return ``[1, 16, T, H/8, W/8]`` float32 latents on the CPU."""
    check_params_for_model(model, params)
    scheduler_class, scheduler_config = manager.scheduler_config(model)
    scheduler = make_scheduler(scheduler_class, scheduler_config, params.flow_shift)
    z_dim = int(model.folder.read_config("vae").get("z_dim", 16))
    noise = initial_noise(params, z_dim)
    with manager.dit_in_use(model, config) as transformer:
        predictor = DiTNoisePredictor(transformer, conditioning, manager.device, model.dit_dtype)
        return denoise(predictor, scheduler, params, noise, manager.device, observer)


def decode_video(manager: OffloadManager, model: LoadedWan, config: OffloadConfig, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents to frames ``[F, H, W, 3]``, float32 in 0..1, on the CPU."""
    from .decoding import decode_latents

    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = getattr(latents, "shape", None)
        raise ConfigError(
            "latents", shape, "must be a 5-D video latent [1, 16, T, H/8, W/8]", "connect the Sample node's LATENT"
        )
    with manager.encoder_in_use(model, "vae", config.vae_cpu_offload, config) as (vae, device):
        return decode_latents(vae, latents, device)

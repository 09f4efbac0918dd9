"""The stages of a Wan2.1 generation - encode, sample, decode - each run through the offload manager.

The ComfyUI nodes call these one per node; ``VideoGenerator`` calls all of them. Each stage asks the manager for
the component it needs, so the placement rules live in one place.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from .config import OffloadConfig, SamplingParams, validate_prompt
from .errors import ConfigError, OffloadOutOfMemoryError
from .loading import make_scheduler
from .manager import LoadedWan, OffloadManager
from .sampling import Conditioning, DiTNoisePredictor, StepObserver, denoise, initial_noise
from .text_encoding import encode_prompt

logger = logging.getLogger(__name__)


def _with_auto_offload(manager: OffloadManager, model: LoadedWan, config: OffloadConfig, stage):
    """Run ``stage(effective_config)``; with ``auto_offload``, step along the recommended order on each OOM."""
    while True:
        try:
            return stage(manager.effective_config(model, config))
        except OffloadOutOfMemoryError as error:
            if not manager.escalate(model, config, error):
                raise


def encode_prompts(
    manager: OffloadManager,
    model: LoadedWan,
    config: OffloadConfig,
    prompt: str,
    negative_prompt: str = "",
    image: Any = None,
) -> Conditioning:
    """Encode the prompt, the negative prompt and (image-to-video) the start image; results live on the CPU.

    Embeddings of a prompt are cached by the manager: re-queueing a workflow with the same text does not run the
    text encoder again.
    """
    validate_prompt("prompt", prompt)
    validate_prompt("negative_prompt", negative_prompt, allow_empty=True)
    pil_image = _check_image_for_model(model, image)
    return _with_auto_offload(
        manager, model, config, lambda c: _encode(manager, model, c, prompt, negative_prompt, pil_image)
    )


def _encode(manager, model, config, prompt, negative_prompt, pil_image) -> Conditioning:
    embeds = []
    for text in (prompt, negative_prompt):
        cached = manager.cached_prompt(model, config, text)
        if cached is None:
            tokenizer = manager.tokenizer(model)
            with manager.encoder_in_use(model, "text_encoder", config.text_encoder_cpu_offload, config) as (encoder, device):
                cached = encode_prompt(tokenizer, encoder, text, device).cpu()
            manager.cache_prompt(model, config, text, cached)
        embeds.append(cached)
    image_embeds = None
    if pil_image is not None:
        from .image_conditioning import encode_image_embeds

        processor = manager.image_processor(model)
        with manager.encoder_in_use(model, "image_encoder", config.image_encoder_cpu_offload, config) as (encoder, device):
            image_embeds = encode_image_embeds(processor, encoder, pil_image, device).cpu()
    return Conditioning(embeds[0], embeds[1], image_embeds=image_embeds, image=pil_image)


def _check_image_for_model(model: LoadedWan, image: Any):
    if model.folder.image_to_video:
        if image is None:
            raise ConfigError(
                "image", None, f"{model.name} is an image-to-video model and needs a start image",
                "connect an IMAGE to Encode Prompt's image input (or pass image=... to generate_video)",
            )
        from .image_conditioning import to_pil

        return to_pil(image)
    if image is not None:
        raise ConfigError(
            "image", type(image).__name__, f"{model.name} is a text-to-video model and takes no start image",
            "load a Wan2.1 I2V model, or disconnect the image",
        )
    return None


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
    if model.folder.image_to_video and (conditioning.image is None or conditioning.image_embeds is None):
        raise ConfigError(
            "conditioning", "text only", f"{model.name} is an image-to-video model",
            "encode the prompt with a start image connected",
        )
    return _with_auto_offload(
        manager, model, config, lambda c: _sample(manager, model, c, conditioning, params, observer)
    )


def _sample(manager, model, config, conditioning, params, observer) -> torch.Tensor:
    scheduler_class, scheduler_config = manager.scheduler_config(model)
    scheduler = make_scheduler(scheduler_class, scheduler_config, params.flow_shift)
    z_dim = int(model.folder.read_config("vae").get("z_dim", 16))
    noise = initial_noise(params, z_dim)
    conditioning = _with_image_condition(manager, model, config, conditioning, params)
    if config.distributed:
        return manager.worker_group(model, config).sample(conditioning, params, noise, observer)
    with manager.dit_in_use(model, config) as transformer:
        predictor = DiTNoisePredictor(transformer, conditioning, manager.device, model.dit_dtype)
        return denoise(predictor, scheduler, params, noise, manager.device, observer)


def prepare_image_condition(
    manager: OffloadManager, model: LoadedWan, config: OffloadConfig, conditioning: Conditioning, params: SamplingParams
) -> Conditioning:
    """Image-to-video: VAE-encode the start frame for this video's size (``sample_latents`` does it when needed;
    callers that want it as a stage of its own - timing, or a separate node - call this first)."""
    check_params_for_model(model, params)
    return _with_auto_offload(
        manager, model, config, lambda c: _with_image_condition(manager, model, c, conditioning, params)
    )


def _with_image_condition(manager, model, config, conditioning: Conditioning, params) -> Conditioning:
    if conditioning.image is None or conditioning.image_condition is not None:
        return conditioning
    from .image_conditioning import image_condition_latents

    with manager.encoder_in_use(model, "vae", config.vae_cpu_offload, config) as (vae, device):
        condition = image_condition_latents(vae, conditioning.image, params, device)
    return dataclasses.replace(conditioning, image_condition=condition)


def decode_video(manager: OffloadManager, model: LoadedWan, config: OffloadConfig, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents to frames ``[F, H, W, 3]``, float32 in 0..1, on the CPU."""
    from .decoding import decode_latents

    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = getattr(latents, "shape", None)
        raise ConfigError(
            "latents", shape, "must be a 5-D video latent [1, 16, T, H/8, W/8]", "connect the Sample node's LATENT"
        )

    def decode(config: OffloadConfig) -> torch.Tensor:
        with manager.encoder_in_use(model, "vae", config.vae_cpu_offload, config) as (vae, device):
            return decode_latents(vae, latents, device)

    return _with_auto_offload(manager, model, config, decode)

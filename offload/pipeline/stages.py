"""The stages of a generation - encode, sample, decode - each run through the offload manager, for any family.

The ComfyUI nodes call these one per node; ``VideoGenerator`` calls all of them. Each stage asks the manager for
the component it needs by role, and the model family's steps (``spec.stages``) for what only the family knows, so
the placement rules live in the manager and the model arithmetic in the family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import OffloadConfig, Precision, SamplingParams, validate_prompt
from ..core.chunking import configure_chunking, plan_chunking, tokenwise_bytes_per_token
from ..core.experts import ExpertSchedule
from ..core.denoise import Conditioning, StepObserver, denoise, guided_prediction, initial_noise, make_scheduler
from ..core.loaded_model import LoadedModel
from ..core.auto_offload import config_at_level, levels_for
from ..core.manager import OffloadManager
from ..core.memory_estimate import MemoryEstimate, check_fits, decode_parts, dit_parts, frame_shape, host_parts
from ..core.spec import LatentSpace, Role
from ..core.tensors import tensor_bytes
from ..core.weight_patches import PatchSet
from ..errors import ConfigError, OffloadOutOfMemoryError
from ..families import open_files, open_model
from .loras import check_patches

logger = logging.getLogger(__name__)


def load_model(
    manager: OffloadManager, path: str | Path | Mapping[str, Any], precision: Precision = Precision()
) -> LoadedModel:
    """Check a model of any registered family and register it (fast: no weight is read). ``path`` is a Diffusers
    folder, or a mapping of single files per component (``{"dit": ..., "text_encoder": ..., "vae": ...,
    "image_encoder": ...}``, any of them a Diffusers folder instead: ``families.open_files``)."""
    source, spec = open_files(dict(path)) if isinstance(path, Mapping) else open_model(path)
    return manager.register(source, spec, precision)


def latent_space(model: LoadedModel) -> LatentSpace:
    return model.spec.stages.latent_space(model.source)


def check_params_for_model(model: LoadedModel, params: SamplingParams) -> None:
    """Refuse sizes the model cannot represent: its latent geometry, then its own limits. Reads configs only."""
    latent_space(model).check(params)
    model.spec.stages.check_params(model.source, params)
    if len(model.dit_names) < 2:
        for name in ("guidance_scale_2", "boundary_ratio"):
            if getattr(params, name) is not None:
                raise ConfigError(name, getattr(params, name), f"applies to models with two experts (Wan2.2 A14B); "
                                  f"{model.name} has one DiT", f"leave {name} empty")


def _memory_model(model: LoadedModel) -> Any:
    return model.spec.memory_model(model.source) if model.spec.memory_model is not None else None


def placed_bytes(model: LoadedModel, name: str) -> int:
    """Bytes of component ``name``'s weights once cast to its dtype: of the module itself when it is loaded, else
    from the safetensors headers (no weight read)."""
    loaded = model.components.get(name)
    if isinstance(loaded, torch.nn.Module):
        return tensor_bytes(loaded)
    dtype = model.dtypes.get(name)
    entries = getattr(model.source, "tensor_entries", None)
    if entries is None or dtype is None:
        return model.source.weight_bytes(name)
    total = 0
    for entry in entries(name).values():
        itemsize = dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
        total += math.prod(entry.shape) * itemsize
    return total


def job_memory(manager: OffloadManager, model: LoadedModel, config: OffloadConfig, params: SamplingParams) -> MemoryEstimate:
    """The host and device memory one video of ``params`` needs with ``config`` (``core.memory_estimate``).
    Reads configs and safetensors headers only."""
    space = latent_space(model)
    shape = space.shape(params)
    frames = frame_shape(shape, space.temporal_factor, space.spatial_factor)
    memory_model = _memory_model(model)
    if config.auto_offload:  # the auto walk may end at its most offloaded level: judge the job there
        config = config_at_level(config, len(levels_for(config)) - 1)
    device: dict[str, dict[str, int]] = {}
    dits = model.dit_names
    if dits:
        dit_bytes = max(placed_bytes(model, name) for name in dits)
        itemsize = model.dtypes[dits[0]].itemsize
        layerwise, shards, split = None, 1, 1
        if config.distributed:
            from ..distributed.fsdp import ParallelPlan

            split = ParallelPlan.choose(config.num_gpus, "auto").sp
            if config.dit_cpu_offload:
                layerwise = 2  # shards in host memory; the gathered block and the next one on the device
            else:
                shards = config.num_gpus
        elif config.dit_layerwise_offload:
            resident = config.resident_blocks if isinstance(config.resident_blocks, int) else 0
            layerwise = config.prefetch_depth + 1 + resident
        if layerwise is None and len(dits) > 1:
            # Resident or sharded, every expert stays placed for the whole run; streamed, they share one set of slots.
            dit_bytes = sum(placed_bytes(model, name) for name in dits)
        device["DiT sampling"] = dit_parts(memory_model, space.tokens(shape), dit_bytes, itemsize, shape,
                                           layerwise_blocks=layerwise, shards=shards, sequence_split=split)
    vae = _name(model, Role.VAE)
    if vae is not None:
        vae_dtype = model.dtypes.get(vae, torch.float32)
        device["VAE decode"] = decode_parts(memory_model, frames, placed_bytes(model, vae), vae_dtype.itemsize,
                                            tiled=config.vae_tiling != "off")
    return MemoryEstimate(host=host_parts(shape, frames), device=device)


def check_job_memory(manager: OffloadManager, model: LoadedModel, config: OffloadConfig, params: SamplingParams) -> None:
    """Refuse a job that cannot fit in host memory or on the device, before any weight moves or noise is drawn."""
    what = f"{params.width}x{params.height}, {params.num_frames} frames"
    check_fits(job_memory(manager, model, config, params), what, manager.device)


def check_decode_memory(manager: OffloadManager, model: LoadedModel, latents: torch.Tensor, tiled: bool = False) -> None:
    """The decode part of :func:`check_job_memory`, for latents that come from elsewhere (a LATENT input)."""
    space = latent_space(model)
    frames = frame_shape(tuple(latents.shape), space.temporal_factor, space.spatial_factor)
    vae = _name(model, Role.VAE)
    vae_dtype = model.dtypes.get(vae, torch.float32)
    estimate = MemoryEstimate(
        host=host_parts(None, frames),
        device={"VAE decode": decode_parts(_memory_model(model), frames, placed_bytes(model, vae), vae_dtype.itemsize,
                                           tiled)},
    )
    check_fits(estimate, f"a latent of shape {tuple(latents.shape)}", manager.device)


def _with_auto_offload(manager: OffloadManager, model: LoadedModel, config: OffloadConfig, stage):
    """Run ``stage(effective_config)``; with ``auto_offload``, step along the recommended order on each OOM."""
    while True:
        try:
            return stage(manager.effective_config(model, config))
        except OffloadOutOfMemoryError as error:
            if not manager.escalate(model, config, error):
                raise


def _name(model: LoadedModel, role: Role) -> str | None:
    component = model.spec.first(role)
    return None if component is None else component.name


def encode_prompts(
    manager: OffloadManager,
    model: LoadedModel,
    config: OffloadConfig,
    prompt: str,
    negative_prompt: str = "",
    image: Any = None,
) -> Conditioning:
    """Encode the prompt, the negative prompt and (image-to-video) the start image; results live on the CPU.

    Embeddings of a prompt are cached per model: re-queueing a workflow with the same text does not run the text
    encoder again.
    """
    validate_prompt("prompt", prompt)
    validate_prompt("negative_prompt", negative_prompt, allow_empty=True)
    start = _check_image_for_model(model, image)
    return _with_auto_offload(manager, model, config, lambda c: _encode(manager, model, c, prompt, negative_prompt, start))


def _encode(manager, model: LoadedModel, config: OffloadConfig, prompt, negative_prompt, start) -> Conditioning:
    stages = model.spec.stages
    encoder_name = _name(model, Role.TEXT_ENCODER)
    embeds = []
    for text in (prompt, negative_prompt):
        key = (text, "cpu" if config.text_encoder_cpu_offload else manager.device.type)
        cached = model.prompt_cache.get(key)
        if cached is None:
            tokenizer = manager.component(model, _name(model, Role.TOKENIZER))
            with manager.in_use(model, encoder_name, config) as (encoder, device):
                cached = stages.encode_text(tokenizer, encoder, text, device)
            model.prompt_cache.put(key, cached)
        else:
            logger.debug("prompt embedding cache hit")
        embeds.append(cached)
    image_embeds = None
    image_encoder = _name(model, Role.IMAGE_ENCODER)
    if start is not None and image_encoder is not None:
        processor = manager.component(model, _name(model, Role.IMAGE_PROCESSOR))
        with manager.in_use(model, image_encoder, config) as (encoder, device):
            image_embeds = stages.encode_image(processor, encoder, start, device)
    return Conditioning(embeds[0], embeds[1], image_embeds=image_embeds, image=start)


def _check_image_for_model(model: LoadedModel, image: Any):
    if model.spec.optional_image:
        return None if image is None else model.spec.stages.prepare_image(image)
    if model.spec.image_to_video:
        if image is None:
            raise ConfigError(
                "image", None, f"{model.name} is an image-to-video model and needs a start image",
                "connect an IMAGE to Encode Prompt's image input (or pass image=... to generate_video)",
            )
        return model.spec.stages.prepare_image(image)
    if image is not None:
        raise ConfigError(
            "image", type(image).__name__, f"{model.name} is a text-to-video model and takes no start image",
            "load an image-to-video model, or disconnect the image",
        )
    return None


def sample_latents(
    manager: OffloadManager,
    model: LoadedModel,
    config: OffloadConfig,
    conditioning: Conditioning,
    params: SamplingParams,
    observer: StepObserver | None = None,
    loras: Mapping[str, PatchSet] | None = None,
) -> torch.Tensor:
    """Denoise from the seed's noise; return the normalised latents ``[1, C, T, H/s, W/s]``, float32, on the CPU.

    ``loras``: per DiT name, the LoRAs (with strengths) its device copies carry during this run (``pipeline.loras``
    reads them); DiTs not named run without. The host copy of the weights is never changed."""
    check_params_for_model(model, params)
    loras = check_patches(model, loras, config.distributed)
    check_job_memory(manager, model, config, params)
    if model.spec.image_to_video and conditioning.image is None:
        raise ConfigError(
            "conditioning", "text only", f"{model.name} is an image-to-video model",
            "encode the prompt with a start image connected",
        )
    return _with_auto_offload(manager, model, config,
                              lambda c: _sample(manager, model, c, conditioning, params, observer, loras))


def _sample(manager, model: LoadedModel, config: OffloadConfig, conditioning, params, observer,
            loras: Mapping[str, PatchSet] | None = None) -> torch.Tensor:
    scheduler_component = model.spec.first(Role.SCHEDULER)
    scheduler_class, scheduler_config = manager.component(model, scheduler_component.name)
    scheduler = make_scheduler(scheduler_component.resolve, scheduler_class, scheduler_config, params.flow_shift,
                               params.sampler)
    space = latent_space(model)
    noise = initial_noise(params, space)
    conditioning = _with_image_condition(manager, model, config, conditioning, params)
    plan_decode_ahead = _decode_planning(manager, model, config, (1, *noise.shape[1:]))
    if config.distributed:
        from ..distributed.launcher import WorkerGroup
        from ..distributed.sampling import sample_payload

        group = manager.worker_group(model, WorkerGroup.key_for(model, config), lambda: WorkerGroup.start(model, config))
        check_sequence_split(group.plan, space, tuple(noise.shape))
        payload = sample_payload(conditioning, params, (scheduler_class, scheduler_config), noise)
        plan_decode_ahead()  # this process only waits for the workers now
        latents = group.call("sample", payload, observer, total_steps=params.num_inference_steps)["latents"]
        return _finish_latents(model, latents, conditioning)
    stages = model.spec.stages
    dits = model.dit_names
    num_train = int(scheduler.config.get("num_train_timesteps", 1000))
    with contextlib.ExitStack() as stack:
        predictors = {}
        for name in dits:
            dit, device = stack.enter_context(manager.in_use(model, name, config, (loras or {}).get(name)))
            _chunk_tokenwise_layers(manager, model, name, dit, config, space.tokens(noise.shape))
            predictors[name] = stages.noise_predictor(dit, conditioning, device, model.dtypes[name])

        schedule: list[ExpertSchedule] = []

        def predict(index: int, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            if not schedule:  # the scheduler's timesteps are set by now
                schedule.append(ExpertSchedule.of(stages, model.source, dits, scheduler.timesteps, num_train, params))
                if len(dits) > 1:
                    manager.log_once(f"{model.name}: steps per expert {schedule[0].counts()}")
            plan = schedule[0]
            name = plan.dit(index)
            scale, guided = plan.guidance(index)
            following = plan.next_dit(index)
            if following is not None:  # the last step of this expert: stream the next one's first blocks meanwhile
                forwards = 2 if guided and predictors[name].has_uncond else 1
                manager.prefetch_next_dit(model, name, following, forwards)
            return guided_prediction(predictors[name], latents, timestep, scale, guided)

        # After the placement, whose Python work would share the interpreter with the planning: from here on the
        # device has steps queued, and the few launches per block lose nothing to it.
        plan_decode_ahead()
        latents = denoise(predict, scheduler, params, noise, manager.device, observer)
    return _finish_latents(model, latents, conditioning)


def _vae_class(model: LoadedModel, vae: str) -> type:
    return model.spec.component(vae).resolve(model.source.class_name(vae))


def _decode_plan_key(model: LoadedModel, config: OffloadConfig, latent_shape: tuple[int, ...]) -> tuple:
    return "vae decode tiles", model.source.identity, tuple(latent_shape), config.vae_tiling


def _decode_planning(manager: OffloadManager, model: LoadedModel, config: OffloadConfig,
                     latent_shape: tuple[int, ...]) -> Callable[[], None]:
    """What starts planning the decode of one video's ``latent_shape`` latents in the background, for the sampler
    to call once its steps are queued, so that the tiling is ready when sampling ends. Why: choosing the tiles
    replays the VAE on the meta device (0.5-1 s of CPU at Wan's real size, the first time a process meets a size),
    which otherwise sits between the last step and the first tile.

    The decode's free memory is predicted here, before the DiT is placed: what is available now, less the VAE's
    weights when they are not on the device yet, less a resident DiT about to be placed (a fully streamed one gives
    its device memory back when sampling ends). A prediction that misses costs only replays at the decode, which
    always chooses its tiling from the memory it finds."""
    planner = getattr(model.spec.stages, "decode_planner", None)
    vae = _name(model, Role.VAE)
    available = manager.available_bytes()
    if planner is None or vae is None or config.vae_tiling == "off" or (available is None and config.vae_tiling == "auto"):
        return lambda: None  # nothing to plan: untiled, or "auto" without memory figures (the CPU) decodes untiled
    if available is not None:
        if not manager.on_device(model, vae):
            available -= placed_bytes(model, vae)
        if not config.dit_layerwise_offload:
            available -= sum(placed_bytes(model, name) for name in model.dit_names if not manager.on_device(model, name))
        available = max(available, 0)
    def prepare() -> Callable[[], object] | None:  # in the caller's thread; a failure here is only logged
        return planner(_vae_class(model, vae), model.source.config(vae), model.dtypes.get(vae), latent_shape,
                       config.vae_tiling, available)

    def start() -> None:
        manager.background.start(_decode_plan_key(model, config, latent_shape), prepare, "VAE decode tiles",
                                 once=False)  # each run with its own budget (a quick replay when met before)

    return start


def _finish_latents(model: LoadedModel, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
    """The family's last touch on sampled latents (``FamilyStages`` optional ``finish_latents``)."""
    finish = getattr(model.spec.stages, "finish_latents", None)
    return latents if finish is None else finish(latents, conditioning)


def check_sequence_split(plan: Any, space: LatentSpace, latent_shape: tuple[int, ...]) -> None:
    """Ulysses splits a video's tokens evenly over the sequence-parallel ranks: refuse a size that does not split,
    before anything is sent to the workers."""
    _, _, frames, height, width = latent_shape
    plan.check_video(
        space.tokens(latent_shape), f"{frames} latent frames x {height * space.spatial_factor}x{width * space.spatial_factor}",
        f"pick height and width such that (height/{space.pixel_multiple}) x (width/{space.pixel_multiple}) x latent "
        f"frames is a multiple of {plan.sp} (480x832 and 720x1280 are)",
    )


def _chunk_tokenwise_layers(manager, model: LoadedModel, name: str, dit, config: OffloadConfig, tokens: int) -> None:
    """``dit_activation_chunking``: run the DiT's token-wise layers over chunks of the sequence when asked, or (auto)
    when the device's free memory is short for them; logged when it changes."""
    modules = model.spec.stages.tokenwise_modules(dit)
    if not modules:
        return
    per_token = tokenwise_bytes_per_token(modules[0])
    # The family's smallest efficient slice, but never so large that fewer than four slices remain (short
    # sequences, tiny test models, still chunk when memory says so).
    floor = min(getattr(model.spec.stages, "slice_floor_tokens", 1024), max(tokens // 4, 1))
    size = plan_chunking(config.dit_activation_chunking, tokens, per_token, manager.available_bytes(), floor)
    # The family's own sliced block forward bounds every token-wise step; without one, the feed-forward alone.
    whole_blocks = model.spec.stages.chunk_blocks(dit, size)
    configure_chunking(modules, None if whole_blocks else size)
    if whole_blocks and size is not None:  # the family's sliced forward launches the kernels compiled ahead
        manager.wait_for_kernels(model, name)
    what = "blocks' token-wise steps" if whole_blocks and size is not None else "token-wise layers"
    message = (f"{model.name}/{name}: {what} run whole ({tokens} tokens)" if size is None else
               f"{model.name}/{name}: {what} run in chunks of {size} of {tokens} tokens "
               f"(dit_activation_chunking={config.dit_activation_chunking}; feed-forward "
               f"{tokens * per_token / 2**30:.2f} GiB unchunked)")
    manager.log_once(message)


def prepare_image_condition(
    manager: OffloadManager, model: LoadedModel, config: OffloadConfig, conditioning: Conditioning, params: SamplingParams
) -> Conditioning:
    """Image-to-video: VAE-encode the start frame for this video's size (``sample_latents`` does it when needed;
    callers that want it as a stage of its own - timing, or a separate node - call this first)."""
    check_params_for_model(model, params)
    return _with_auto_offload(manager, model, config, lambda c: _with_image_condition(manager, model, c, conditioning, params))


def _with_image_condition(manager, model: LoadedModel, config, conditioning: Conditioning, params) -> Conditioning:
    if conditioning.image is None or conditioning.image_condition is not None:
        return conditioning
    if config.vae_tiling != "off":  # the tiling is planned from free memory: make it usable as planned
        manager.compact_device_memory()
    with manager.in_use(model, _name(model, Role.VAE), config) as (vae, device):
        condition = model.spec.stages.image_condition(vae, conditioning.image, params, latent_space(model), device,
                                                      config.vae_tiling, manager.available_bytes())
    return dataclasses.replace(conditioning, image_condition=condition)


def check_latents(model: LoadedModel, latents: Any) -> torch.Tensor:
    """Latents this model's VAE can decode: ``[B, C, T, h, w]`` with its channel count and no empty axis."""
    latent_space(model).check_latents(latents)
    return latents


def decode_video(manager: OffloadManager, model: LoadedModel, config: OffloadConfig, latents: torch.Tensor) -> torch.Tensor:
    """Decode normalised latents ``[B, C, T, h, w]`` to frames ``[B*F, H, W, 3]``, float32 in 0..1, on the CPU.

    A batch of several videos decodes one video at a time, their frames one after the other (as ComfyUI's VAE
    Decode lays out a batch of video latents), never only the first."""
    latents = check_latents(model, latents)
    space = latent_space(model)
    check_decode_memory(manager, model, latents, tiled=config.vae_tiling != "off")

    def decode(config: OffloadConfig) -> torch.Tensor:
        if config.vae_tiling != "off":  # the tiling is planned from free memory: make it usable as planned
            manager.compact_device_memory()
            # planned ahead while sampling (_decode_planning): let it finish rather than replay beside it
            manager.background.wait(_decode_plan_key(model, config, (1, *latents.shape[1:])))
        with manager.in_use(model, _name(model, Role.VAE), config) as (vae, device):
            videos = [model.spec.stages.decode(vae, latents[i:i + 1], space, device, config.vae_tiling,
                                               manager.available_bytes()) for i in range(latents.shape[0])]
        return videos[0] if len(videos) == 1 else torch.cat(videos)

    return _with_auto_offload(manager, model, config, decode)

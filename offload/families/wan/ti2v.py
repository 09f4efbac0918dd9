"""Wan2.2 TI2V-5B: one model for text-to-video and image-to-video, in the Wan2.2 VAE's latent space.

What differs from Wan2.1, as diffusers runs it (``WanPipeline`` / ``WanImageToVideoPipeline`` with
``expand_timesteps=True``; the hub folder is a ``WanPipeline`` and the I2V pipeline loads the same folder):

- **latents**: 48 channels at 1/16 of the frame size (the Wan2.2 VAE: ``z_dim`` 48, ``scale_factor_spatial`` 16);
  the DiT (in and out channels 48) takes them alone, nothing concatenated;
- **per-token timesteps**: the DiT gets a timestep for every token, ``(mask[:, ::2, ::2] * t).flatten()`` - all ``t``
  in text-to-video (numerically not bit-equal to the scalar path, so the per-token path is taken there too);
- **image-to-video** (a start image given, or not, to the same model): only the start frame is VAE-encoded; latent
  frame 0 is replaced by it before every DiT pass (``(1 - mask) * condition + mask * latents``), its tokens get
  timestep 0, and it is pasted again into the final latents before decoding.
- no image encoder, no CLIP features.

Sequence parallelism needs nothing more: diffusers' context-parallel plan for ``WanTransformer3DModel`` splits a
per-token ``timestep`` over the ranks with the tokens.

Decoding (and the start frame's encode) goes through the family's exact tiled VAE (``vae_tiling``), which covers the
Wan2.2 VAE's structure (patchify, the ``AvgDown3D``/``DupUp3D`` shortcuts) as well as the Wan2.1 VAE's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import SamplingParams
from ...core.denoise import Branch, Conditioning
from ...core.spec import ComponentSpec, DefaultConfig, FileLayout, LatentSpace, ModelSpec, Role
from ...core.spec import NotThisFile, lazy_classes
from ...distributed.sampling import sample_in_workers
from .config_checks import check_wan_configs, wan_memory_model
from .files import DIT_KINDS, HEAD_WIDTH, NOT_YET, Tensors, Umt5Format, dit_config, size_label
from .parallelize import parallelize_wan
from .shapes import WAN_DIT_COMMON, WAN_SCHEDULER
from .spec import SINGLE_FILES_T2V, TEXT_ENCODER, TOKENIZER, VAE, WanStages
from .vae22 import Wan22VaeFormat

TI2V_CHANNELS = 48
"""Latent channels of the Wan2.2 VAE, and the TI2V DiT's input and output channels."""
TI2V_5B_DIT = dict(WAN_DIT_COMMON, in_channels=TI2V_CHANNELS, out_channels=TI2V_CHANNELS, num_attention_heads=24,
                   ffn_dim=14336, num_layers=30)
"""``WanTransformer3DModel`` arguments of the TI2V-5B DiT (dim 3072, 5.0B parameters), for benchmarks."""
TI2V_FLOW_SHIFT = 5.0
"""The TI2V-5B Diffusers folder's scheduler shift (diffusers' converter); single files carry no scheduler."""

TRANSFORMER = ComponentSpec("transformer", Role.DIT, lazy_classes("diffusers", "WanTransformer3DModel"), precision="dit")
SCHEDULER = ComponentSpec("scheduler", Role.SCHEDULER, lazy_classes("diffusers", "UniPCMultistepScheduler",
                                                                    "FlowMatchEulerDiscreteScheduler"))
HINT = "a Diffusers-format Wan2.2 TI2V-5B folder (Wan2.2-TI2V-5B-Diffusers)"


def is_ti2v_index(index: dict) -> bool:
    """A ``WanPipeline`` folder written with ``expand_timesteps=True`` and one DiT: TI2V-5B."""
    return bool(index.get("expand_timesteps")) and not index.get("boundary_ratio")


# ------------------------------------------------------------------------------------------------------ files


class Ti2vDitFormat:
    """The TI2V-5B DiT file (``diffusion_models/wan2.2_ti2v_5B_fp16.safetensors``): a Wan DiT whose patch embedding
    takes and whose head gives 48 channels (ComfyUI's ``WAN22_T2V`` match: out_dim 48)."""

    expected = "the Wan2.2 TI2V-5B DiT (diffusion_models/wan2.2_ti2v_5B_fp16.safetensors)"

    def recognise(self, tensors: Tensors) -> FileLayout:
        config, names = dit_config(tensors)
        if config["in_channels"] != TI2V_CHANNELS or config["out_channels"] != TI2V_CHANNELS:
            # Say what the file is when Wan's other kinds know it (the registry reports the first reason it gets).
            for matches, what in NOT_YET:
                if matches(config):
                    raise NotThisFile(f"it is {what}")
            kind = next((k for k in DIT_KINDS if k.matches(config)), None)
            raise NotThisFile(f"it is a {kind.name} DiT" if kind is not None else
                              f"it takes {config['in_channels']} and gives {config['out_channels']} latent channels, "
                              f"not TI2V-5B's {TI2V_CHANNELS}")
        if config["image_dim"] is not None:
            raise NotThisFile("it has a CLIP image embedder, which TI2V-5B has not")
        label = size_label(config["num_attention_heads"] * HEAD_WIDTH, config["num_layers"])
        return FileLayout(f"Wan2.2 TI2V {label} DiT", "WanTransformer3DModel", config, names)


SINGLE_FILES_TI2V = {
    "tokenizer": SINGLE_FILES_T2V["tokenizer"],
    "transformer": Ti2vDitFormat(),
    "text_encoder": Umt5Format(),
    "vae": Wan22VaeFormat(),
    "scheduler": DefaultConfig("transformer", "UniPCMultistepScheduler",
                               lambda config_of: dict(WAN_SCHEDULER, flow_shift=TI2V_FLOW_SHIFT)),
}
"""How TI2V-5B is read from ComfyUI's single files: the DiT, UMT5 (with its tokenizer inside) and the Wan2.2 VAE."""


# ------------------------------------------------------------------------------------------------------ sampling


def first_frame_mask(latent_shape: tuple[int, ...], has_image: bool, device: torch.device) -> torch.Tensor:
    """``[1, 1, T, h, w]`` float32: 1 where the latents are denoised, 0 on latent frame 0 when a start image gives it
    (``WanImageToVideoPipeline``'s ``first_frame_mask``; all ones in text-to-video, as ``WanPipeline``'s mask)."""
    _, _, frames, height, width = latent_shape
    mask = torch.ones(1, 1, frames, height, width, dtype=torch.float32, device=device)
    if has_image:
        mask[:, :, 0] = 0
    return mask


def paste_first_frame(latents: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latent frame 0 replaced by the start image's latent, written as diffusers writes it (bit for bit)."""
    return (1 - mask) * condition + mask * latents


class Ti2vNoisePredictor:
    """Runs the TI2V DiT for one guidance branch: frame 0 pasted from the start image (if any) and one timestep per
    token, 0 on the pasted frame."""

    def __init__(self, transformer: nn.Module, conditioning: Conditioning, device: torch.device, dtype: torch.dtype):
        self.transformer = transformer
        self.dtype = dtype
        self.device = device
        self.text = {"cond": conditioning.prompt_embeds.to(device=device, dtype=dtype)}
        if conditioning.negative_prompt_embeds is not None:
            self.text["uncond"] = conditioning.negative_prompt_embeds.to(device=device, dtype=dtype)
        self.has_uncond = "uncond" in self.text
        # float32 like the pipeline's: the paste is computed in float32, then cast to the DiT's dtype.
        self.condition = None
        if conditioning.image_condition is not None:
            self.condition = conditioning.image_condition.to(device=device, dtype=torch.float32)
        patch = tuple(getattr(transformer, "config", {}).get("patch_size", (1, 2, 2)))
        self.stride = patch[1:]
        self._mask: tuple[tuple[int, ...], torch.Tensor] | None = None

    def mask(self, latents: torch.Tensor) -> torch.Tensor:
        shape = tuple(latents.shape)
        if self._mask is None or self._mask[0] != shape:
            self._mask = (shape, first_frame_mask(shape, self.condition is not None, latents.device))
        return self._mask[1]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch) -> torch.Tensor:
        mask = self.mask(latents)
        latent_input = latents if self.condition is None else paste_first_frame(latents, self.condition, mask)
        latent_input = latent_input.to(self.dtype)
        per_token = (mask[0][0][:, :: self.stride[0], :: self.stride[1]] * timestep[0]).flatten()
        return self.transformer(
            hidden_states=latent_input,
            timestep=per_token.unsqueeze(0).expand(latents.shape[0], -1),
            encoder_hidden_states=self.text[branch],
            return_dict=False,
        )[0]


class Ti2vStages(WanStages):
    """TI2V-5B's steps, numerically identical to diffusers' ``WanPipeline`` (text only) and
    ``WanImageToVideoPipeline`` (a start image) with ``expand_timesteps=True``."""

    def image_condition(self, vae: nn.Module, image: Any, params: SamplingParams, space: LatentSpace, device: torch.device,
                        tiling: str = "off", available_bytes: int | None = None) -> torch.Tensor:
        """``[1, 48, 1, h, w]`` float32: the normalised latent of the start frame alone (in exact spatial tiles when
        ``tiling`` asks, ``tiling_policy``)."""
        from diffusers.video_processor import VideoProcessor

        from .tiling_policy import encode_grid

        pixels = VideoProcessor(vae_scale_factor=space.spatial_factor).preprocess(image, height=params.height,
                                                                                  width=params.width)
        pixels = pixels.to(dtype=torch.float32).unsqueeze(2)
        dtype = next(vae.parameters()).dtype
        tiles = encode_grid(vae, tuple(pixels.shape), tiling, available_bytes)
        with torch.no_grad():
            if tiles is None:
                latent = vae.encode(pixels.to(device, dtype)).latent_dist.mode()
            else:
                from .vae_tiling import encode_tiled

                latent = encode_tiled(vae, pixels.to(dtype), tiles.grid, device=device,
                                      frame_split=tiles.frame_split).mode()
        return space.from_raw(latent.to(torch.float32)).cpu()

    def noise_predictor(self, dit: nn.Module, conditioning: Conditioning, device: torch.device, dtype: torch.dtype):
        return Ti2vNoisePredictor(dit, conditioning, device, dtype)

    def finish_latents(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """Image-to-video: the start frame's latent pasted into frame 0 of the sampled latents (the denoising loop
        stepped a noisy copy of it that no DiT pass read)."""
        if conditioning.image_condition is None:
            return latents
        condition = conditioning.image_condition.to(latents.device, torch.float32)
        return paste_first_frame(latents, condition, first_frame_mask(tuple(latents.shape), True, latents.device))


STAGES = Ti2vStages()
WAN22_TI2V = ModelSpec(
    name="wan2.2-ti2v", family="wan2.2", pipeline_class="WanPipeline", matches=is_ti2v_index, optional_image=True,
    components=(TOKENIZER, TEXT_ENCODER, TRANSFORMER, VAE, SCHEDULER), files=SINGLE_FILES_TI2V, stages=STAGES,
    module=__name__, parallelize=parallelize_wan, worker_methods={"sample": sample_in_workers},
    check_configs=check_wan_configs, memory_model=wan_memory_model,
)
"""TI2V-5B, text-to-video or (with a start image) image-to-video."""

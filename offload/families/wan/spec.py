"""The Wan2.1 family's specs: its components and roles, latent geometry, denoising loop and parallel plan."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import SamplingParams
from ...core.denoise import Conditioning
from ...core.spec import ComponentSpec, DefaultConfig, EmbeddedIn, LatentSpace, ModelSource, ModelSpec, Role, lazy_classes
from ...errors import ConfigError
from ...distributed.sampling import sample_in_workers
from .config_checks import check_wan_configs, wan_memory_model
from .files import SPIECE_MODEL, ClipVisionHFormat, Umt5Format, WanDitFormat, WanVaeFormat
from .lora import read_wan_lora
from .parallelize import parallelize_wan
from .shapes import WAN_SCHEDULER

TOKENIZER = ComponentSpec("tokenizer", Role.TOKENIZER, lazy_classes("transformers", "T5Tokenizer", "T5TokenizerFast", "AutoTokenizer"))
TEXT_ENCODER = ComponentSpec(
    "text_encoder", Role.TEXT_ENCODER, lazy_classes("transformers", "UMT5EncoderModel", "T5EncoderModel"),
    precision="dit", host_modules=("shared", "encoder.embed_tokens"),
)
TRANSFORMER = ComponentSpec("transformer", Role.DIT, lazy_classes("diffusers", "WanTransformer3DModel"), precision="dit")
VAE = ComponentSpec("vae", Role.VAE, lazy_classes("diffusers", "AutoencoderKLWan"), precision="vae")
SCHEDULER = ComponentSpec("scheduler", Role.SCHEDULER, lazy_classes("diffusers", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"))
IMAGE_ENCODER = ComponentSpec(
    "image_encoder", Role.IMAGE_ENCODER, lazy_classes("transformers", "CLIPVisionModel", "CLIPVisionModelWithProjection"),
    precision="vae",
)
IMAGE_PROCESSOR = ComponentSpec(
    "image_processor", Role.IMAGE_PROCESSOR,
    lazy_classes("transformers", "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"),
)

HINT = "a Diffusers-format Wan2.1 folder (for example Wan2.1-T2V-1.3B-Diffusers)"


def _tokenizer_from_spiece(data: bytes) -> Any:
    from .text import tokenizer_from_sentencepiece

    return tokenizer_from_sentencepiece(data)


def _image_processor_config(config_of) -> dict:
    """The CLIP preprocessing of the Wan I2V folders (OpenAI mean/std, shortest edge then center crop), at the
    image encoder's own input size (224 for ViT-H/14)."""
    size = int(config_of("image_encoder")["image_size"])
    return {"crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}}


SINGLE_FILES_T2V = {
    "transformer": WanDitFormat(image_to_video=False),
    "text_encoder": Umt5Format(),
    "vae": WanVaeFormat(),
    "tokenizer": EmbeddedIn(
        "text_encoder", SPIECE_MODEL, "T5Tokenizer", _tokenizer_from_spiece,
        missing="use Comfy-Org's umt5_xxl_fp8_e4m3fn_scaled.safetensors (or umt5_xxl_fp16.safetensors), which carry "
                "the tokenizer, or give the text encoder as a Diffusers Wan2.1 folder",
    ),
    "scheduler": DefaultConfig("transformer", "UniPCMultistepScheduler", lambda config_of: dict(WAN_SCHEDULER)),
}
"""How a Wan2.1 model is read from ComfyUI's single files (``core.spec.ModelSpec.files``)."""
SINGLE_FILES_I2V = {
    **SINGLE_FILES_T2V,
    "transformer": WanDitFormat(image_to_video=True),
    "image_encoder": ClipVisionHFormat(),
    "image_processor": DefaultConfig("image_encoder", "CLIPImageProcessor", _image_processor_config),
}


class WanStages:
    """The Wan2.1 steps, numerically identical to diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``."""

    slice_floor_tokens = 8192
    """The smallest slice the lean block (``dit_activation_chunking``) runs with. One 14B block at 32,760 tokens on
    an H200: slices of 8,192 took 1.03x diffusers' block time and 1.64 GiB of activations, slices of 4,096 1.09x
    and 1.56 GiB; what a slice adds is small beside the whole-sequence tensors attention needs."""

    def latent_space(self, source: ModelSource) -> LatentSpace:
        vae = source.config("vae")
        dit = source.config("transformer")
        return LatentSpace(
            channels=int(vae.get("z_dim", 16)),
            temporal_factor=int(vae.get("scale_factor_temporal", 4)),
            spatial_factor=int(vae.get("scale_factor_spatial", 8)),
            patch=tuple(int(p) for p in dit.get("patch_size", (1, 2, 2))),
            mean=tuple(vae["latents_mean"]) if "latents_mean" in vae else None,
            std=tuple(vae["latents_std"]) if "latents_std" in vae else None,
        )

    def check_params(self, source: ModelSource, params: SamplingParams) -> None:
        """Refuse sizes the model cannot represent: its rotary tables end at ``rope_max_seq_len`` per axis."""
        space = self.latent_space(source)
        config = source.config("transformer")
        limit = int(config.get("rope_max_seq_len", 1024))
        p_t, p_h, p_w = space.patch
        s, t = space.spatial_factor, space.temporal_factor
        latent_frames = (params.num_frames - 1) // t + 1
        checks = (
            ("num_frames", params.num_frames, latent_frames // p_t, t * limit * p_t - (t - 1)),
            ("height", params.height, params.height // s // p_h, limit * p_h * s),
            ("width", params.width, params.width // s // p_w, limit * p_w * s),
        )
        for name, value, positions, maximum in checks:
            if positions > limit:
                raise ConfigError(name, value, f"is larger than this model supports ({maximum})", f"use {name} <= {maximum}")

    def encode_text(self, tokenizer: Any, encoder: nn.Module, text: str, device: torch.device) -> torch.Tensor:
        from .text import encode_prompt

        return encode_prompt(tokenizer, encoder, text, device).cpu()

    def prepare_image(self, image: Any) -> Any:
        from .image import to_pil

        return to_pil(image)

    def encode_image(self, processor: Any, encoder: nn.Module, image: Any, device: torch.device) -> torch.Tensor:
        from .image import encode_image_embeds

        return encode_image_embeds(processor, encoder, image, device).cpu()

    def image_condition(self, vae: nn.Module, image: Any, params: SamplingParams, space: LatentSpace, device: torch.device,
                        tiling: str = "off", available_bytes: int | None = None) -> torch.Tensor:
        from .image import image_condition_latents

        return image_condition_latents(vae, image, params, space, device, tiling, available_bytes)

    def noise_predictor(self, dit: nn.Module, conditioning: Conditioning, device: torch.device, dtype: torch.dtype):
        from .predictor import WanNoisePredictor

        return WanNoisePredictor(dit, conditioning, device, dtype)

    def dit_for_step(self, source: ModelSource, dits: tuple[str, ...], timestep: float, num_train_timesteps: int,
                     params: SamplingParams) -> str:
        return dits[0]

    def decode(self, vae: nn.Module, latents: torch.Tensor, space: LatentSpace, device: torch.device,
               tiling: str = "off", available_bytes: int | None = None) -> torch.Tensor:
        from .decode import decode_latents

        return decode_latents(vae, latents, space, device, tiling, available_bytes)

    def sequence_parallel_heads(self, dit_config: dict) -> int | None:
        return int(dit_config.get("num_attention_heads", 40))

    def tokenwise_modules(self, dit: nn.Module) -> list[nn.Module]:
        return [block.ffn for block in dit.blocks]

    def decode_planner(self, vae_cls: type, vae_config: dict, dtype: torch.dtype, latent_shape: tuple[int, ...],
                       tiling: str, available_bytes: int | None):
        from .tiling_policy import decode_planner

        return decode_planner(vae_cls, vae_config, dtype, latent_shape, tiling, available_bytes)

    def kernel_compile(self, dit_config: dict, dtype: torch.dtype, device: torch.device):
        from .lean_block import lean_kernel_compile

        return lean_kernel_compile(dit_config, dtype, device)

    def chunk_blocks(self, dit: nn.Module, max_tokens: int | None) -> bool:
        from .lean_block import apply_lean_blocks, remove_lean_blocks

        if max_tokens is None:
            remove_lean_blocks(list(dit.blocks))
            return True
        return apply_lean_blocks(list(dit.blocks), max_tokens) == len(dit.blocks)


STAGES = WanStages()
_COMMON = dict(family="wan2.1", stages=STAGES, module=__name__, parallelize=parallelize_wan,
               worker_methods={"sample": sample_in_workers}, check_configs=check_wan_configs,
               memory_model=wan_memory_model, read_lora=read_wan_lora)

WAN21_T2V = ModelSpec(
    name="wan2.1-t2v", pipeline_class="WanPipeline",
    components=(TOKENIZER, TEXT_ENCODER, TRANSFORMER, VAE, SCHEDULER), files=SINGLE_FILES_T2V, **_COMMON,
)
WAN21_I2V = ModelSpec(
    name="wan2.1-i2v", pipeline_class="WanImageToVideoPipeline", image_to_video=True,
    components=(TOKENIZER, TEXT_ENCODER, TRANSFORMER, VAE, SCHEDULER, IMAGE_ENCODER, IMAGE_PROCESSOR),
    files=SINGLE_FILES_I2V, **_COMMON,
)
SPECS = (WAN21_T2V, WAN21_I2V)

"""The Wan2.1 family's config bounds and config-vs-weights checks, and its memory figures.

Run when a model is opened (``ModelSpec.check_configs``), before any component is built: every number a
constructor or the scheduler allocates with is bounded, and every number the weights also encode is compared with
their safetensors headers. Bounds are generous (the real 14B models sit far inside them); they exist so that a
hostile or damaged folder fails in milliseconds instead of allocating gigabytes.
"""

from __future__ import annotations

import math
from typing import Any

from ...core.config_checks import ConfigReader
from ...core.memory_estimate import MemoryModel

MAX_ROPE_POSITIONS = 8192
"""Wan's rotary tables have ``rope_max_seq_len`` positions per axis (1024 in every released model)."""
MAX_TRAIN_TIMESTEPS = 100_000
"""Schedulers allocate tables of ``num_train_timesteps`` entries (1000 in every released model)."""
MAX_IMAGE_SIDE = 4096


def check_wan_configs(source: Any, dits: tuple[str, ...] = ("transformer", "transformer_2")) -> None:
    """Bounds and header agreement for every Wan component the source has."""
    for name in dits:
        if source.has(name):
            _check_transformer(ConfigReader(source, name))
    _check_vae(ConfigReader(source, "vae"))
    _check_text_encoder(ConfigReader(source, "text_encoder"))
    _check_scheduler(ConfigReader(source, "scheduler"))
    if source.has("image_encoder"):
        _check_image_encoder(ConfigReader(source, "image_encoder"))
    if source.has("image_processor"):
        _check_image_processor(ConfigReader(source, "image_processor"))


def _check_transformer(c: ConfigReader) -> None:
    patch = c.ints("patch_size", 1, 16, (3, 3), default=(1, 2, 2))
    heads = c.int("num_attention_heads", 1, 1024, 40)
    head_dim = c.int("attention_head_dim", 2, 1024, 128)
    in_channels = c.int("in_channels", 1, 4096, 16)
    out_channels = c.int("out_channels", 1, 4096, 16)
    text_dim = c.int("text_dim", 1, 65536, 4096)
    freq_dim = c.int("freq_dim", 2, 65536, 256)
    ffn_dim = c.int("ffn_dim", 1, 1_000_000, 13824)
    layers = c.int("num_layers", 1, 1000, 40)
    c.int("rope_max_seq_len", 1, MAX_ROPE_POSITIONS, 1024)
    c.int("image_dim", 1, 65536, optional=True)
    c.int("added_kv_proj_dim", 1, 1_000_000, optional=True)
    c.int("pos_embed_seq_len", 1, 65536, optional=True)
    c.expect_blocks("num_layers", layers, "blocks")
    c.expect_shape("patch_embedding.weight", 0, heads * head_dim, "num_attention_heads")
    c.expect_shape("patch_embedding.weight", 1, in_channels, "in_channels")
    for axis, size in enumerate(patch, start=2):
        c.expect_shape("patch_embedding.weight", axis, size, "patch_size")
    c.expect_shape("blocks.0.ffn.net.0.proj.weight", 0, ffn_dim, "ffn_dim")
    c.expect_shape("condition_embedder.text_embedder.linear_1.weight", 1, text_dim, "text_dim")
    c.expect_shape("condition_embedder.time_embedder.linear_1.weight", 1, freq_dim, "freq_dim")
    c.expect_shape("proj_out.weight", 0, out_channels * math.prod(patch), "out_channels")


def _check_vae(c: ConfigReader) -> None:
    z_dim = c.int("z_dim", 1, 1024, 16)
    base_dim = c.int("base_dim", 1, 4096, 96)
    dim_mult = c.ints("dim_mult", 1, 64, (1, 8), default=(1, 2, 4, 4))
    c.int("num_res_blocks", 1, 64, 2)
    downsample = c.config.get("temperal_downsample", [False, True, True])
    if not (isinstance(downsample, list) and len(downsample) == len(dim_mult) - 1
            and all(isinstance(v, bool) for v in downsample)):
        raise c.fail("temperal_downsample", downsample, f"must be a list of {len(dim_mult) - 1} true/false values")
    c.int("scale_factor_temporal", 1, 64, 4)
    c.int("scale_factor_spatial", 1, 64, 8)
    c.numbers("latents_mean", z_dim)
    c.numbers("latents_std", z_dim, positive=True)
    c.expect_shape("decoder.conv_in.weight", 1, z_dim, "z_dim")
    c.expect_shape("encoder.conv_in.weight", 0, base_dim, "base_dim")  # the encoder starts at base_dim channels


def _check_text_encoder(c: ConfigReader) -> None:
    d_model = c.int("d_model", 1, 65536, 4096)
    vocab = c.int("vocab_size", 1, 10_000_000, 256384)
    c.int("num_heads", 1, 1024, 64)
    c.int("d_kv", 1, 4096, 64)
    c.int("d_ff", 1, 1_000_000, 10240)
    c.int("relative_attention_num_buckets", 1, 4096, 32)
    c.int("relative_attention_max_distance", 1, 1_000_000, 128)
    layers = c.int("num_layers", 1, 1000, 24)
    c.expect_blocks("num_layers", layers, "encoder.block")
    c.expect_shape("shared.weight", 0, vocab, "vocab_size")
    c.expect_shape("shared.weight", 1, d_model, "d_model")


def _check_image_encoder(c: ConfigReader) -> None:
    c.int("hidden_size", 1, 65536, 1280)
    image_size = c.int("image_size", 1, MAX_IMAGE_SIDE, 224)
    c.int("patch_size", 1, image_size, 14)
    c.int("num_attention_heads", 1, 1024, 16)
    c.int("intermediate_size", 1, 1_000_000, 5120)
    layers = c.int("num_hidden_layers", 1, 1000, 32)
    entries = c.entries()
    prefix = "vision_model.encoder.layers" if any(n.startswith("vision_model.") for n in entries) else "encoder.layers"
    c.expect_blocks("num_hidden_layers", layers, prefix)


def _check_image_processor(c: ConfigReader) -> None:
    """CLIP preprocessing resizes to ``size`` and crops to ``crop_size``: both bound the pixels it allocates."""
    for key in ("size", "crop_size"):
        value = c.config.get(key)
        if value is None:
            continue
        sides = list(value.values()) if isinstance(value, dict) else [value]
        if not sides or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in sides):
            raise c.fail(key, value, f"must be a side length (or lengths) from 1 to {MAX_IMAGE_SIDE} pixels")


def _check_scheduler(c: ConfigReader) -> None:
    c.int("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS, 1000)
    for key in ("flow_shift", "shift"):
        c.number(key, 0.01, 100.0, optional=True)
    c.int("solver_order", 1, 3, optional=True)
    betas = c.config.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or len(betas) > MAX_TRAIN_TIMESTEPS):
        raise c.fail("trained_betas", betas, f"must be null or a list of at most {MAX_TRAIN_TIMESTEPS} numbers")


def wan_memory_model(source: Any) -> MemoryModel:
    """Rough per-token and per-pixel figures for the memory estimate (``core.memory_estimate``).

    DiT: per video token, the hidden states, q, k, v, the attention output and the residual (6 x dim) plus the
    FFN's hidden layer (ffn_dim) in the compute dtype, and two float32 copies of the hidden states (the float32
    normalisation and modulation). Calibrated on the measured peaks of docs/benchmarks.md: 130 KB per token
    estimated vs about 115 KB measured for 14B in bf16 (480x832x81, 32,760 tokens: 3.6 GiB of activations), and
    49 KB vs about 50 KB for 1.3B.

    VAE decode: 64 x ``base_dim`` elements per pixel of an output frame (6144 for Wan2.1's base_dim 96): the
    decoder's full-resolution feature maps and causal caches for one chunk of frames. Calibrated on the 11.1 GiB
    decode peak (0.5 GB of weights) at 480x832x81 in float32.
    """
    dit = source.config("transformer")
    dim = int(dit.get("num_attention_heads", 40)) * int(dit.get("attention_head_dim", 128))
    vae = source.config("vae")
    return MemoryModel(
        dit_elements_per_token=6 * dim + int(dit.get("ffn_dim", 13824)),
        dit_fp32_elements_per_token=2 * dim,
        dit_blocks=int(dit.get("num_layers", 40)),
        vae_elements_per_pixel=64 * int(vae.get("base_dim", 96)),
    )

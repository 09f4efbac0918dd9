"""Tiny random-weight Wan2.2 A14B models (T2V and I2V, two experts), as Diffusers folders and as Comfy-Org files.

The same layout as ``Wan-AI/Wan2.2-{T2V,I2V}-A14B-Diffusers``: ``model_index.json`` naming ``transformer`` (the
high-noise expert) and ``transformer_2`` (the low-noise one, with other random weights) and ``boundary_ratio``
(0.875 T2V, 0.9 I2V); the I2V model has no ``image_encoder``/``image_processor``, and its experts take 36 input
channels with no image embedder. The text encoder, tokenizer, VAE and scheduler are those of ``tiny.build_tiny_wan``
for the same seed and sizes. ``export_a14b_files`` writes the experts under Comfy-Org's names
(``wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors``...) with the text encoder and VAE beside them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from .tiny import TINY_TEXT_DIM, TinyWanSpec, build_tiny_wan
from .wan22 import DEFAULT_BOUNDARY


def _expert(spec: TinyWanSpec, in_channels: int, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.num_attention_heads, attention_head_dim=spec.attention_head_dim,
        in_channels=in_channels, out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=spec.rope_max_seq_len,
    ).eval()


def build_tiny_wan22_a14b(
    path: str | Path, *, image_to_video: bool = False, seed: int = 0, spec: TinyWanSpec = TinyWanSpec(),
    tokenizer=None, boundary_ratio: float | None = None, flow_shift: float = 3.0,
) -> Path:
    """Write a tiny Wan2.2 A14B T2V (or I2V) folder at ``path`` and return it. Deterministic in its arguments; the
    two experts have different weights (seeds ``seed + 1`` and ``seed + 5``). ``boundary_ratio`` defaults to the
    released model's."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline)
    from transformers import T5Tokenizer, UMT5EncoderModel

    path = Path(path)
    with tempfile.TemporaryDirectory() as work:
        base = build_tiny_wan(Path(work) / "base", seed, dataclasses.replace(spec, image_to_video=False), tokenizer)
        components = dict(
            tokenizer=tokenizer if tokenizer is not None else T5Tokenizer.from_pretrained(base / "tokenizer"),
            text_encoder=UMT5EncoderModel.from_pretrained(base / "text_encoder").eval(),
            vae=AutoencoderKLWan.from_pretrained(base / "vae").eval(),
        )
    components["scheduler"] = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )
    in_channels = 36 if image_to_video else 16
    high, low = _expert(spec, in_channels, seed + 1), _expert(spec, in_channels, seed + 5)
    ratio = DEFAULT_BOUNDARY[image_to_video] if boundary_ratio is None else boundary_ratio
    if image_to_video:
        pipe = WanImageToVideoPipeline(image_encoder=None, image_processor=None, transformer=high, transformer_2=low,
                                       boundary_ratio=ratio, **components)
    else:
        pipe = WanPipeline(transformer=high, transformer_2=low, boundary_ratio=ratio, **components)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def comfy_org_name(image_to_video: bool, noise: str, layout: str) -> str:
    """Comfy-Org's file name of one expert: ``wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors``."""
    return f"wan2.2_{'i2v' if image_to_video else 't2v'}_{noise}_noise_14B_{layout}.safetensors"


def export_a14b_files(folder: str | Path, out_dir: str | Path, layout: str, *, spiece_model: bytes | None,
                      dit_prefix: str = "") -> dict[str, Path]:
    """A tiny Wan2.2 A14B folder's components as Comfy-Org-style single files in ``layout`` (``fp16``,
    ``fp8_scaled``...): the experts under their Comfy-Org names, the text encoder and VAE as ``comfy_export``
    writes them. Returns the paths by loader argument: ``dit`` (high noise), ``dit_2`` (low noise),
    ``text_encoder``, ``vae``."""
    import json

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from .comfy_export import export_component

    folder, out_dir = Path(folder), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_to_video = json.loads((folder / "model_index.json").read_text())["_class_name"] == "WanImageToVideoPipeline"
    paths = {}
    for argument, component, noise in (("dit", "transformer", "high"), ("dit_2", "transformer_2", "low")):
        model = WanTransformer3DModel.from_pretrained(str(folder / component), dtype=torch.float32)
        paths[argument] = export_component(model, "transformer", out_dir / comfy_org_name(image_to_video, noise, layout),
                                           layout, prefix=dit_prefix)
    encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32)
    paths["text_encoder"] = export_component(encoder, "text_encoder", out_dir / f"text_encoder_{layout}.safetensors",
                                             layout, spiece_model=spiece_model)
    vae = AutoencoderKLWan.from_pretrained(str(folder / "vae"), dtype=torch.float32)
    paths["vae"] = export_component(vae, "vae", out_dir / "wan_2.1_vae.safetensors", "fp16" if layout == "fp16" else "bf16")
    return paths

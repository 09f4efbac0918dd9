"""Tiny, random-weight Wan2.2 TI2V-5B models for tests: a Diffusers folder, and the Comfy-Org single files.

The folder has the layout of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``: a ``WanPipeline`` with ``expand_timesteps=True``,
a DiT of 48 input and output channels, the Wan2.2 VAE (``is_residual``, ``patch_size`` 2, 16x spatial, the real
latent statistics) and UniPC at shift 5. Sizes are small but the structure is the real one where single files
cannot say otherwise (attention heads of 128, the VAE's four levels of two residual blocks, UMT5's attention
distance), so the same model can be written as ``wan2.2_ti2v_5B_fp16.safetensors`` + ``wan2.2_vae.safetensors``
and read back. Every weight is rounded to a float16 value, so the fp16 files hold exactly the folder's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .tiny import TINY_TEXT_DIM, _build_tokenizer
from .vae22 import WAN22_VAE

COMFY_ORG_TI2V_NAMES = {
    "dit": ("diffusion_models", "wan2.2_ti2v_5B_fp16.safetensors"),
    "vae": ("vae", "wan2.2_vae.safetensors"),
    "text_encoder": ("text_encoders", "umt5_xxl_fp16.safetensors"),
}
"""Where ComfyUI's TI2V-5B template finds each file, as Comfy-Org names them."""


@dataclass(frozen=True)
class TinyTi2vSpec:
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 128
    ffn_dim: int = 32
    vae_base_dim: int = 4
    vae_decoder_base_dim: int = 6
    vae_dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2


def _fp16_values(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))
    return module


def build_tiny_ti2v(path: str | Path, seed: int = 0, spec: TinyTi2vSpec = TinyTi2vSpec(), tokenizer=None) -> Path:
    """Write a tiny TI2V-5B Diffusers folder at ``path`` and return it (weights depend only on ``seed`` and
    ``spec``). ``tokenizer`` replaces the built-in one (e.g. the one of ``comfy_export.tiny_sentencepiece_model``,
    to also write a text encoder file that carries it)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .ti2v import TI2V_CHANNELS, TI2V_FLOW_SHIFT

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else _build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.num_attention_heads, attention_head_dim=spec.attention_head_dim,
        in_channels=TI2V_CHANNELS, out_channels=TI2V_CHANNELS, text_dim=TINY_TEXT_DIM, freq_dim=256,
        ffn_dim=spec.ffn_dim, num_layers=spec.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(**dict(
        WAN22_VAE, base_dim=spec.vae_base_dim, decoder_base_dim=spec.vae_decoder_base_dim,
        dim_mult=list(spec.vae_dim_mult), num_res_blocks=spec.vae_num_res_blocks,
    )).eval()
    for module in (text_encoder, transformer, vae):
        _fp16_values(module)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=TI2V_FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, expand_timesteps=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def export_ti2v_single_files(folder: str | Path, out_dir: str | Path, *, spiece_model: bytes | None = None,
                             comfy_folders: bool = False) -> dict[str, Path]:
    """Write a TI2V folder's DiT and VAE as Comfy-Org's fp16 files (and, given the tokenizer's sentencepiece model,
    the text encoder as ``umt5_xxl_fp16`` with it inside: a folder built with that tokenizer,
    ``text.tokenizer_from_sentencepiece``, then has exactly the files' numbers and tokens); returns the paths by loader argument (``dit``, ``vae``,
    ``text_encoder``). ``comfy_folders`` puts them under ``diffusion_models/``, ``vae/``, ``text_encoders/`` as a
    ComfyUI ``models`` folder holds them."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from .comfy_export import dit_key, export_component, layout_items, write_safetensors
    from .vae22 import native_key

    folder, out_dir = Path(folder), Path(out_dir)

    def target(argument: str) -> Path:
        sub, name = COMFY_ORG_TI2V_NAMES[argument]
        place = out_dir / sub if comfy_folders else out_dir
        place.mkdir(parents=True, exist_ok=True)
        return place / name

    paths = {}
    dit = WanTransformer3DModel.from_pretrained(str(folder / "transformer"), dtype=torch.float32)
    named = [(name, tuple(t.shape), lambda t=t: t) for name, t in dit.state_dict().items()]
    paths["dit"] = write_safetensors(target("dit"), layout_items(named, dit_key, "fp16", set()))
    vae = AutoencoderKLWan.from_pretrained(str(folder / "vae"), dtype=torch.float32)
    res_blocks = int(vae.config.num_res_blocks)
    named = [(name, tuple(t.shape), lambda t=t: t) for name, t in vae.state_dict().items()]
    paths["vae"] = write_safetensors(target("vae"),
                                     layout_items(named, lambda n: native_key(n, res_blocks), "fp16", set()))
    if spiece_model is not None:
        encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32)
        paths["text_encoder"] = export_component(encoder, "text_encoder", target("text_encoder"), "fp16",
                                                 spiece_model=spiece_model)
    return paths

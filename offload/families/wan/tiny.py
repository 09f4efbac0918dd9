"""Build tiny, random-weight, Diffusers-format Wan2.1 folders for tests and the demo.

No machine here reaches a model hub, so the project makes its own models: the same classes and on-disk layout
as the real ``Wan-AI/Wan2.1-*-Diffusers`` folders (``model_index.json`` and one subfolder per component, weights
in safetensors), with seeded random weights and a tokenizer built locally from a small Unigram vocabulary.
Everything the real loader does runs unchanged on these folders; only the sizes differ.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_TEXT_DIM = 32
TINY_IMAGE_DIM = 32


@dataclass(frozen=True)
class TinyWanSpec:
    """Sizes of a tiny Wan model. Defaults give a model that renders a 17-frame 64x64 clip in about a second."""

    num_layers: int = 2
    """DiT blocks; layerwise tests want several so that streaming actually cycles slots."""
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    ffn_dim: int = 32
    vae_base_dim: int = 3
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_num_res_blocks: int = 1
    text_max_distance: int = 16
    """UMT5's ``relative_attention_max_distance`` (the real model's is 128)."""
    rope_max_seq_len: int = 32
    image_dim: int = TINY_IMAGE_DIM
    image_heads: int = 4
    image_act: str = "quick_gelu"
    """The CLIP tower's activation (transformers' default; ViT-H/14 uses gelu)."""
    image_to_video: bool = False
    """Also write ``image_encoder/`` and ``image_processor/`` (Wan2.1 I2V layout)."""


SINGLE_FILE_TINY = TinyWanSpec(
    attention_head_dim=128, vae_base_dim=4, vae_dim_mult=(1, 2, 4, 4), vae_num_res_blocks=2, text_max_distance=128,
    rope_max_seq_len=1024, image_dim=80, image_heads=1, image_act="gelu",
)
"""A tiny model whose components have the real ones' structure where single files cannot say otherwise: heads of
128 (Wan's DiT) and 80 (ViT-H), UMT5's attention distance, the Wan2.1 VAE's levels. Single files carry shapes, not
configs, so a loader reads these from shapes the way ComfyUI does; tests of single files build this one."""


def _build_tokenizer():
    """A T5-style Unigram tokenizer over letters, digits, punctuation and a few words, made without downloads."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = "a the of and in on with through field sunflower raccoon lion cat dog video light".split()
    pieces += [("\u2581" + w, -5.0) for w in words]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -9.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_wan(path: str | Path, seed: int = 0, spec: TinyWanSpec = TinyWanSpec(), tokenizer=None) -> Path:
    """Write a tiny Wan2.1 T2V (or I2V) folder at ``path`` and return it.

    The weights depend only on ``seed`` and ``spec``, so two calls give byte-identical models. ``tokenizer``
    replaces the built-in one (a T5 tokenizer; the text encoder's vocabulary follows its size).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else _build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=spec.text_max_distance,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim,
        in_channels=36 if spec.image_to_video else 16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=spec.rope_max_seq_len,
        image_dim=spec.image_dim if spec.image_to_video else None,
        added_kv_proj_dim=(spec.num_attention_heads * spec.attention_head_dim) if spec.image_to_video else None,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim,
        z_dim=16,
        dim_mult=list(spec.vae_dim_mult),
        num_res_blocks=spec.vae_num_res_blocks,
        temperal_downsample=[False, True, True],
    ).eval()
    # The real Wan2.1 folders ship this scheduler configuration (flow-matching UniPC, shift 3 for 480p).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )

    components = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )
    if spec.image_to_video:
        from diffusers import WanImageToVideoPipeline

        image_encoder, image_processor = _build_image_encoder(seed + 3, spec)
        pipe = WanImageToVideoPipeline(image_encoder=image_encoder, image_processor=image_processor, **components)
    else:
        from diffusers import WanPipeline

        pipe = WanPipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _build_image_encoder(seed: int, spec: TinyWanSpec):
    """A tiny CLIP vision tower and its processor, shaped like the Wan I2V ``image_encoder`` (penultimate states)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=spec.image_dim,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=spec.image_heads,
            hidden_act=spec.image_act,
            image_size=32,
            patch_size=8,
            projection_dim=spec.image_dim,
        )
    ).eval()
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return encoder, processor

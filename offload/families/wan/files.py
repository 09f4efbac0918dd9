"""What Wan2.1's single files look like: the Comfy-Org repackaged files ComfyUI users already have.

One format per component, each recognising a file from its keys and shapes (never its name), mapping its keys to
the diffusers/transformers names, and deriving the config to build:

- DiT (``diffusion_models/wan2.1_*.safetensors``): the original Wan key layout, with or without ComfyUI's
  ``model.diffusion_model.`` prefix; keys mapped by diffusers' own ``convert_wan_transformer_to_diffusers``, run on
  placeholder (meta) tensors to learn the renaming without reading a weight. Shapes give the width (heads of 128,
  as ComfyUI's ``model_detection`` counts them), the input channels, the feed-forward width, the block count and the
  image embedder, hence the kind: :data:`DIT_KINDS` (Wan2.1 T2V, I2V); :data:`NOT_YET` names the Wan files this
  format refuses (a Wan2.2 I2V A14B expert given alone: ``wan22.Wan22ExpertFormat`` reads the pair; TI2V-5B);
- text encoder (``text_encoders/umt5_xxl_*.safetensors``): already transformers' ``UMT5EncoderModel`` names; its
  tokenizer is the sentencepiece model ComfyUI stores in the same file (``spiece_model``);
- VAE (``vae/wan_2.1_vae.safetensors``): mapped by diffusers' ``convert_wan_vae_to_diffusers`` (the Wan2.1 layout;
  the 48-channel Wan2.2 VAE is recognised and refused until its mapping lands);
- image encoder (``clip_vision/clip_vision_h.safetensors``): already transformers' ``CLIPVisionModel`` names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ...core.spec import FileLayout, FileTensor, NotThisFile
from .shapes import CLIP_VIT_H, UMT5_XXL, WAN_DIT_COMMON, WAN_VAE

Tensors = Mapping[str, FileTensor]

COMFY_PREFIX = "model.diffusion_model."
SPIECE_MODEL = "spiece_model"
"""Where ComfyUI keeps the UMT5 tokenizer (its sentencepiece model, as uint8) in the text encoder's file."""
HEAD_WIDTH = 128
"""Wan's attention head width: the DiT's head count is its width / 128 (ComfyUI's ``model_detection`` rule)."""
CLIP_HEAD_WIDTH = 80
"""ViT-H/14's attention head width (1280 / 16)."""


def converted_names(convert: Callable[[dict], dict], tensors: Tensors) -> dict[str, str]:
    """Diffusers name -> file key, learned by running diffusers' conversion on one meta tensor per key (identity
    tells which key became which name; nothing is read or allocated)."""
    placeholders = {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in tensors.items()}
    key_of = {id(tensor): key for key, tensor in placeholders.items()}
    mapping = {}
    for name, tensor in convert(dict(placeholders)).items():
        key = key_of.get(id(tensor))
        if key is None:
            raise NotThisFile(f"diffusers' conversion rebuilt {name} instead of renaming it, which this loader cannot stream")
        mapping[name] = key
    return mapping


def count_indexed(tensors: Tensors, pattern: str) -> int:
    """How many ``N`` make ``pattern.format(N)`` a prefix of some key (blocks 0..N-1)."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    found = {int(m.group(1)) for key in tensors if (m := regex.match(key))}
    return max(found) + 1 if found else 0


def size_label(dim: int, layers: int) -> str:
    return {(1536, 30): "1.3B", (5120, 40): "14B", (3072, 30): "5B"}.get((dim, layers), f"{layers} blocks of width {dim}")


# ------------------------------------------------------------------------------------------------------ DiT

OTHER_WAN_DITS = (
    ("vace_patch_embedding.weight", "a Wan VACE DiT"),
    ("control_adapter.conv.weight", "a Wan Fun camera-control DiT"),
    ("casual_audio_encoder.encoder.final_linear.weight", "a Wan2.2 S2V (speech-to-video) DiT"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "a HuMo DiT"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "a Wan2.2 Animate DiT"),
    ("img_emb.emb_pos", "a Wan2.1 FLF2V (first-last-frame) DiT"),
)
"""Wan variants ComfyUI tells apart by a marker key (``model_detection``), none of which this pack runs."""


@dataclass(frozen=True)
class DitKind:
    """A kind of Wan DiT file this pack runs: its name and which spec reads it."""

    name: str
    image_to_video: bool
    matches: Callable[[dict], bool]


DIT_KINDS = (
    DitKind("Wan2.1 T2V", False, lambda c: c["in_channels"] == 16 and c["out_channels"] == 16 and c["image_dim"] is None),
    DitKind("Wan2.1 I2V", True, lambda c: c["in_channels"] == 36 and c["out_channels"] == 16 and c["image_dim"] is not None),
)
"""The extension point for new kinds (Wan2.2's experts: same shapes as Wan2.1 14B, told apart by the pair a user
loads, and TI2V-5B): a row here plus a spec whose DiT format accepts it."""

NOT_YET = (
    (lambda c: c["in_channels"] == 36 and c["image_dim"] is None,
     "a Wan2.2 I2V A14B expert (36 input channels, no CLIP image embedder): give it as dit with its low-noise "
     "expert as dit_2 (or the low-noise one as dit_2 with its high-noise expert as dit)"),
    (lambda c: c["in_channels"] == 48,
     "a Wan2.2 TI2V-5B DiT (48 latent channels), read by the TI2V spec (families/wan/ti2v.py)"),
)


def dit_config(tensors: Tensors) -> tuple[dict, dict[str, str]]:
    """The ``WanTransformer3DModel`` config of a Wan DiT file, and its diffusers name -> file key map."""
    if "head.modulation" not in tensors and COMFY_PREFIX + "head.modulation" not in tensors:
        raise NotThisFile(what_is(tensors) or "it has no head.modulation, so it is not a Wan DiT")
    stripped = {k.removeprefix(COMFY_PREFIX) for k in tensors}
    for marker, what in OTHER_WAN_DITS:
        if marker in stripped:
            raise NotThisFile(f"it is {what}, which this pack does not run")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    names = converted_names(convert_wan_transformer_to_diffusers, tensors)

    def shape(name: str) -> tuple[int, ...]:
        if name not in names:
            raise NotThisFile(f"it lacks the tensor diffusers calls {name}")
        return tensors[names[name]].shape

    patch = shape("patch_embedding.weight")
    dim, in_channels = patch[0], patch[1]
    if dim % HEAD_WIDTH:
        raise NotThisFile(f"its width {dim} is not a multiple of Wan's {HEAD_WIDTH}-wide attention heads")
    image_dim = shape("condition_embedder.image_embedder.norm1.weight")[0] if (
        "condition_embedder.image_embedder.norm1.weight" in names) else None
    config = dict(
        WAN_DIT_COMMON,
        patch_size=tuple(patch[2:]),
        num_attention_heads=dim // HEAD_WIDTH,
        attention_head_dim=HEAD_WIDTH,
        in_channels=in_channels,
        out_channels=shape("proj_out.weight")[0] // math.prod(patch[2:]),
        text_dim=shape("condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=shape("condition_embedder.time_embedder.linear_1.weight")[1],
        ffn_dim=shape("blocks.0.ffn.net.0.proj.weight")[0],
        num_layers=count_indexed(names, "blocks.{}."),
        cross_attn_norm="blocks.0.norm2.weight" in names,
        image_dim=image_dim,
        added_kv_proj_dim=dim if "blocks.0.attn2.add_k_proj.weight" in names else None,
    )
    return config, names


@dataclass(frozen=True)
class WanDitFormat:
    """A Wan2.1 DiT file of one kind (text-to-video or image-to-video)."""

    image_to_video: bool

    @property
    def expected(self) -> str:
        if self.image_to_video:
            return "a Wan2.1 image-to-video DiT (diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors or similar)"
        return ("a Wan2.1 text-to-video DiT (diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors, "
                "wan2.1_t2v_1.3B_fp16.safetensors or similar)")

    def recognise(self, tensors: Tensors) -> FileLayout:
        config, names = dit_config(tensors)
        for matches, what in NOT_YET:
            if matches(config):
                raise NotThisFile(f"it is {what}")
        kind = next((k for k in DIT_KINDS if k.matches(config)), None)
        if kind is None:
            raise NotThisFile(
                f"its shapes ({config['in_channels']} input channels, image embedder "
                f"{'present' if config['image_dim'] else 'absent'}) match no Wan2.1 DiT"
            )
        if kind.image_to_video != self.image_to_video:
            raise NotThisFile(f"it is a {kind.name} DiT")
        label = size_label(config["num_attention_heads"] * HEAD_WIDTH, config["num_layers"])
        return FileLayout(f"{kind.name} {label} DiT", "WanTransformer3DModel", config, names)


# ------------------------------------------------------------------------------------------------------ UMT5


class Umt5Format:
    """UMT5-XXL's encoder (``umt5_xxl_fp8_e4m3fn_scaled.safetensors``, ``umt5_xxl_fp16.safetensors``)."""

    expected = "the UMT5-XXL text encoder (text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16)"

    def recognise(self, tensors: Tensors) -> FileLayout:
        block = "encoder.block.{}.layer."
        required = ("shared.weight", "encoder.final_layer_norm.weight", "encoder.block.0.layer.0.SelfAttention.q.weight")
        if not all(k in tensors for k in required):
            raise NotThisFile(what_is(tensors) or "it has no encoder.block.N.layer.0.SelfAttention (T5 naming)")
        if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in tensors:
            raise NotThisFile("it is a T5 encoder without the gated feed-forward of UMT5")
        layers = count_indexed(tensors, block)
        bias = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
        if not all(bias.format(i) in tensors for i in range(layers)):
            raise NotThisFile("it is a T5 encoder (such as t5xxl_fp16.safetensors), not UMT5: UMT5 has a relative "
                              "attention bias in every block")
        vocab, d_model = tensors["shared.weight"].shape
        buckets, heads = tensors[bias.format(0)].shape
        config = dict(
            UMT5_XXL,
            vocab_size=vocab,
            d_model=d_model,
            num_heads=heads,
            relative_attention_num_buckets=buckets,
            d_kv=tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
            d_ff=tensors["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
            num_layers=layers,
        )
        keys = {key: key for key in tensors if key != SPIECE_MODEL}  # transformers' own names
        return FileLayout(f"UMT5 text encoder ({layers} blocks of width {d_model})", "UMT5EncoderModel", config, keys)


# ------------------------------------------------------------------------------------------------------ VAE


class WanVaeFormat:
    """The Wan2.1 VAE (``wan_2.1_vae.safetensors``), in the original Wan layout."""

    expected = "the Wan2.1 VAE (vae/wan_2.1_vae.safetensors)"

    def recognise(self, tensors: Tensors) -> FileLayout:
        if "decoder.middle.0.residual.0.gamma" not in tensors:
            raise NotThisFile(what_is(tensors) or "it has no decoder.middle.0.residual.0.gamma, so it is not a Wan VAE")
        if "decoder.upsamples.0.upsamples.0.residual.2.weight" in tensors:
            raise NotThisFile("it is the Wan2.2 VAE (48 latent channels, wan2.2_vae.safetensors), which goes with "
                              "the Wan2.2 TI2V-5B DiT only")
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        names = converted_names(convert_wan_vae_to_diffusers, tensors)
        try:
            base = tensors[names["encoder.conv_in.weight"]].shape[0]
            z_dim = tensors[names["post_quant_conv.weight"]].shape[0]
        except KeyError as e:
            raise NotThisFile(f"it lacks {e.args[0]}") from None
        levels: list[list[int]] = [[]]
        temporal: list[bool] = []
        for index in range(count_indexed(names, "encoder.down_blocks.{}.")):
            prefix = f"encoder.down_blocks.{index}."
            if prefix + "resample.1.weight" in names:
                temporal.append(prefix + "time_conv.weight" in names)
                levels.append([])
            elif prefix + "conv1.weight" in names:
                levels[-1].append(tensors[names[prefix + "conv1.weight"]].shape[0])
        res_blocks = {len(level) for level in levels}
        if len(res_blocks) != 1 or not levels[0]:
            raise NotThisFile("its encoder levels have different numbers of residual blocks")
        config = dict(
            WAN_VAE,
            base_dim=base,
            z_dim=z_dim,
            dim_mult=[level[0] // base for level in levels],
            num_res_blocks=res_blocks.pop(),
            temperal_downsample=temporal,
        )
        return FileLayout(f"Wan2.1 VAE (base width {base}, {z_dim} latent channels)", "AutoencoderKLWan", config, names)


# ------------------------------------------------------------------------------------------------------ CLIP


class ClipVisionHFormat:
    """OpenCLIP ViT-H/14's vision tower in transformers naming (``clip_vision_h.safetensors``)."""

    expected = "the CLIP ViT-H/14 vision encoder (clip_vision/clip_vision_h.safetensors)"

    def recognise(self, tensors: Tensors) -> FileLayout:
        if "visual.transformer.resblocks.0.attn.in_proj_weight" in tensors:
            raise NotThisFile("it uses open_clip's key names (visual.transformer...), which this pack does not convert; "
                              "use Comfy-Org's clip_vision_h.safetensors")
        patch_key = "vision_model.embeddings.patch_embedding.weight"
        if patch_key not in tensors:
            raise NotThisFile(what_is(tensors) or "it has no vision_model.embeddings, so it is not a CLIP vision encoder")
        hidden, _, patch, _ = tensors[patch_key].shape
        positions = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]
        side = math.isqrt(positions - 1)
        if hidden % CLIP_HEAD_WIDTH or side * side != positions - 1:
            raise NotThisFile(f"its width {hidden} and {positions} positions are not a ViT-H/14's")
        config = dict(
            CLIP_VIT_H,
            hidden_size=hidden,
            num_attention_heads=hidden // CLIP_HEAD_WIDTH,
            intermediate_size=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=count_indexed(tensors, "vision_model.encoder.layers.{}."),
            patch_size=patch,
            image_size=patch * side,
        )
        if "visual_projection.weight" in tensors:
            config["projection_dim"] = tensors["visual_projection.weight"].shape[0]
        # transformers 5's CLIPVisionModel drops the ``vision_model.`` prefix that the file (and
        # CLIPVisionModelWithProjection) has: map both spellings; the names a class does not have are ignored.
        keys = {key: key for key in tensors}
        keys.update({key.removeprefix("vision_model."): key for key in tensors if key.startswith("vision_model.")})
        return FileLayout(f"CLIP vision encoder ({config['num_hidden_layers']} layers of width {hidden})",
                          "CLIPVisionModel", config, keys)


def what_is(tensors: Tensors) -> str | None:
    """A name for a file that is some other component, so a file picked in the wrong list says what it is."""
    keys = {k.removeprefix(COMFY_PREFIX) for k in tensors}
    if "head.modulation" in keys:
        return "it is a Wan DiT (it belongs in diffusion_models)"
    if "decoder.middle.0.residual.0.gamma" in keys:
        return "it is a Wan VAE (it belongs in vae)"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "it is a T5-family text encoder (it belongs in text_encoders)"
    if any(k.startswith(("vision_model.", "visual.")) for k in keys):
        return "it is a CLIP vision encoder (it belongs in clip_vision)"
    if any(k.startswith(("text_model.", "cond_stage_model.")) for k in keys):
        return "it is a CLIP text encoder, not Wan's UMT5"
    if any(k.startswith(("lora_", "diffusion_model.")) or ".lora_" in k for k in keys):
        return "it is a LoRA (it belongs in loras)"
    if any(k.startswith(("first_stage_model.", "model.diffusion_model.input_blocks")) for k in keys):
        return "it is a Stable Diffusion checkpoint"
    return None

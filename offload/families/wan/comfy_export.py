"""Write Wan2.1 components as Comfy-Org-style single files, for tests and benchmarks.

No machine here downloads the real ``wan2.1_t2v_14B_fp8_scaled.safetensors`` and friends, so the tests and benches
make their own, in each layout ComfyUI users hold: bf16, fp16, ``fp8_e4m3fn`` (Linear weights cast to fp8) and
``fp8_scaled`` (Linear weights divided by a per-tensor scale, ``amax / 448``, cast to fp8, with the float32
``<module>.scale_weight`` next to them and the ``scaled_fp8`` marker - ComfyUI's convention). Keys are written in
the original Wan layout (``blocks.N.self_attn.q``, ``decoder.upsamples.N``...) - the inverse of diffusers'
single-file conversion, written out here independently of it, so that reading the files back through diffusers'
conversion is a real test of the loader. The text encoder's file carries the tokenizer's sentencepiece model as
``spiece_model``, as ComfyUI's does.

Files are written tensor by tensor (the header first, from shapes alone), so a 14B model never has to be in memory.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

LAYOUTS = ("bf16", "fp16", "fp8_e4m3fn", "fp8_scaled")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SAFETENSORS_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", FP8: "F8_E4M3", torch.uint8: "U8",
    torch.int64: "I64",
}

Item = tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]
"""``(key, shape, dtype, make)``: one tensor of a file to write, produced when its turn comes."""


def write_safetensors(path: str | Path, items: Iterable[Item]) -> Path:
    """A safetensors file written one tensor at a time, header first (memory: the largest tensor)."""
    items = list(items)
    header, offset = {}, 0
    for key, shape, dtype, _ in items:
        nbytes = dtype.itemsize
        for size in shape:
            nbytes *= size
        header[key] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for key, shape, dtype, make in items:
            tensor = make()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{key}: produced {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}")
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return path


# ------------------------------------------------------------------------------------------------------ key layout

_DIT_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_DIT_BLOCK = [
    ("attn1.", "self_attn."), ("attn2.", "cross_attn."), ("to_out.0.", "o."), ("to_q.", "q."), ("to_k.", "k."),
    ("to_v.", "v."), ("add_k_proj.", "k_img."), ("add_v_proj.", "v_img."), ("norm_added_k.", "norm_k_img."),
    ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."), ("norm2.", "norm3."),
]


def dit_key(name: str) -> str:
    """A ``WanTransformer3DModel`` tensor name -> its key in an original-layout Wan DiT file."""
    if name == "scale_shift_table":
        return "head.modulation"
    for diffusers, original in _DIT_TOP.items():
        if name.startswith(diffusers + "."):
            return original + name[len(diffusers):]
    match = re.fullmatch(r"blocks\.(\d+)\.(.*)", name)
    if match is None:
        raise KeyError(name)
    rest = match.group(2)
    if rest == "scale_shift_table":
        return f"blocks.{match.group(1)}.modulation"
    for diffusers, original in _DIT_BLOCK:
        rest = rest.replace(diffusers, original)
    return f"blocks.{match.group(1)}.{rest}"


_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _resnet_part(rest: str) -> str:
    for diffusers, original in _RESNET.items():
        if rest == diffusers or rest.startswith(diffusers + "."):
            return original + rest[len(diffusers):]
    return rest


def vae_key(name: str) -> str:
    """An ``AutoencoderKLWan`` (Wan2.1 layout, two residual blocks per level) tensor name -> its original key."""
    simple = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
              "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
              "encoder.conv_out": "encoder.head.2", "decoder.norm_out": "decoder.head.0",
              "decoder.conv_out": "decoder.head.2"}
    for diffusers, original in simple.items():
        if name.startswith(diffusers + "."):
            return original + name[len(diffusers):]
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", name):
        side, kind, index, rest = match.groups()
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"
        return f"{side}.middle.{2 * int(index)}.{_resnet_part(rest)}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.*)", name):
        return f"encoder.downsamples.{match.group(1)}.{_resnet_part(match.group(2))}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        block, resnet, rest = match.groups()
        return f"decoder.upsamples.{4 * int(block) + int(resnet)}.{_resnet_part(rest)}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
        return f"decoder.upsamples.{4 * int(match.group(1)) + 3}.{match.group(2)}"
    raise KeyError(name)


def same_key(name: str) -> str:
    return name


def clip_vision_key(name: str) -> str:
    """transformers 5's ``CLIPVisionModel`` names have no ``vision_model.`` prefix; the files (ComfyUI's, and
    ``CLIPVisionModelWithProjection``'s) do."""
    return name if name.startswith(("vision_model.", "visual_projection.")) else "vision_model." + name


KEY_LAYOUTS = {"transformer": dit_key, "vae": vae_key, "text_encoder": same_key, "image_encoder": clip_vision_key}


# ------------------------------------------------------------------------------------------------------ values


def linear_weight_names(model: torch.nn.Module) -> set[str]:
    """The ``.weight`` of every ``nn.Linear``: what ComfyUI's fp8 files store as fp8."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def layout_items(
    named: Iterable[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]],
    key_of: Callable[[str], str],
    layout: str,
    narrow: set[str],
    prefix: str = "",
) -> list[Item]:
    """The items of one file: each tensor under its original key, in the layout's dtypes. ``narrow`` are the
    names stored as fp8 in the fp8 layouts (Linear weights); every other float tensor is bf16 there."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: use one of {LAYOUTS}")
    wide = torch.float16 if layout == "fp16" else torch.bfloat16
    items: list[Item] = []
    scales: dict[str, torch.Tensor] = {}
    for name, shape, make in named:
        key = prefix + key_of(name)
        if layout.startswith("fp8") and name in narrow:
            if layout == "fp8_scaled":
                scale_key = key[: -len("weight")] + "scale_weight"

                def quantized(make=make, scale_key=scale_key):
                    value = make().float()
                    scale = (value.abs().max() / FP8_MAX).clamp(min=2.0**-20).reshape(())
                    scales[scale_key] = scale
                    return (value / scale).to(FP8)

                items.append((key, shape, FP8, quantized))
                items.append((scale_key, (), torch.float32, lambda scale_key=scale_key: scales.pop(scale_key)))
            else:
                items.append((key, shape, FP8, lambda make=make: make().to(FP8)))
        else:
            items.append((key, shape, wide, lambda make=make: make().to(wide)))
    if layout == "fp8_scaled":
        items.append(("scaled_fp8", (0,), FP8, lambda: torch.empty(0, dtype=FP8)))
    return items


def export_component(
    model: torch.nn.Module, component: str, path: str | Path, layout: str, *, prefix: str = "",
    spiece_model: bytes | None = None,
) -> Path:
    """Write ``model`` (a loaded ``transformer``, ``text_encoder``, ``vae`` or ``image_encoder``) as one file."""
    state = model.state_dict()
    named = [(name, tuple(t.shape), lambda t=t: t) for name, t in state.items()
             if not (component == "text_encoder" and name == "encoder.embed_tokens.weight")]  # tied to shared.weight
    narrow = linear_weight_names(model) if component in ("transformer", "text_encoder") else set()
    items = layout_items(named, KEY_LAYOUTS[component], layout, narrow, prefix)
    if spiece_model is not None:
        data = torch.frombuffer(bytearray(spiece_model), dtype=torch.uint8)
        items.append(("spiece_model", tuple(data.shape), torch.uint8, lambda: data))
    return write_safetensors(path, items)


def export_single_files(folder: str | Path, out_dir: str | Path, layout: str, *, spiece_model: bytes | None,
                        dit_prefix: str = "") -> dict[str, Path]:
    """Write a Diffusers-format Wan2.1 folder's components as single files in ``layout``; returns the paths by
    the argument names the loaders take (``dit``, ``text_encoder``, ``vae``, ``image_encoder``)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionModel, UMT5EncoderModel

    folder, out_dir = Path(folder), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaders = {
        "dit": ("transformer", WanTransformer3DModel), "text_encoder": ("text_encoder", UMT5EncoderModel),
        "vae": ("vae", AutoencoderKLWan), "image_encoder": ("image_encoder", CLIPVisionModel),
    }
    paths = {}
    for argument, (component, cls) in loaders.items():
        if not (folder / component).is_dir():
            continue
        model = cls.from_pretrained(str(folder / component), dtype=torch.float32)
        # ComfyUI keeps the VAE and the CLIP vision encoder in bf16/fp16 files and never in fp8.
        own = layout if component in ("transformer", "text_encoder") else ("fp16" if layout == "fp16" else "bf16")
        paths[argument] = export_component(
            model, component, out_dir / f"{component}_{layout}.safetensors", own,
            prefix=dit_prefix if component == "transformer" else "",
            spiece_model=spiece_model if component == "text_encoder" else None,
        )
    return paths


def export_transformer_folder(folder: str | Path, path: str | Path, layout: str, *, prefix: str = "") -> Path:
    """A Diffusers ``transformer/`` folder written as one Comfy-Org-style DiT file, tensor by tensor (a 14B model
    never in memory: each tensor is read from its shard when its turn comes)."""
    from diffusers import WanTransformer3DModel

    from ...weights.safetensors_file import SafetensorsFile
    from ...weights.tensor_source import folder_weight_files, read_model_config

    folder = Path(folder)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(read_model_config(WanTransformer3DModel, folder))
    handles = [SafetensorsFile(f) for f in folder_weight_files(folder)]
    try:
        where = {key: handle for handle in handles for key in handle.entries}
        named = [(name, where[name].entries[name].shape, lambda name=name: where[name].read(name))
                 for name in model.state_dict() if name in where]
        return write_safetensors(path, layout_items(named, dit_key, layout, linear_weight_names(model), prefix))
    finally:
        for handle in handles:
            handle.close()


COMFY_ORG_NAMES = {
    ("dit", "t2v"): "wan2.1_t2v_14B_fp8_scaled.safetensors",
    ("dit", "i2v"): "wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
    ("text_encoder", "t2v"): "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    ("vae", "t2v"): "wan_2.1_vae.safetensors",
    ("image_encoder", "i2v"): "clip_vision_h.safetensors",
}
"""The file names the shipped workflows use, as Comfy-Org's repackaged Wan2.1 files are named."""
COMFY_FOLDERS = {"dit": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae", "image_encoder": "clip_vision"}


def tiny_sentencepiece_model() -> bytes:
    """A small unigram vocabulary (letters, digits, a few words) as a sentencepiece ``.model``."""
    import string

    from ...weights.sentencepiece_model import write_sentencepiece_model

    words = "a the of and in on with through field sunflower raccoon lion cat dog video light turns head".split()
    pieces = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2), ("\u2581", -2.0, 1)]
    pieces += [("\u2581" + w, -5.0, 1) for w in words]
    pieces += [(c, -8.0, 1) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -9.0, 1) for c in string.ascii_lowercase]
    unique = list({p: (p, s, t) for p, s, t in reversed(pieces)}.values())[::-1]  # each piece once, first kept
    return write_sentencepiece_model(unique)


def write_tiny_comfyui_models(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Tiny random Wan2.1 T2V and I2V models as the files the shipped workflows name, in a ComfyUI ``models`` folder
    (``diffusion_models/``, ``text_encoders/``, ``vae/``, ``clip_vision/``), scaled fp8 where Comfy-Org's are, for
    running the workflows in a real ComfyUI. The VAE is full-size (random weights): ComfyUI's own VAE Loader builds
    the Wan2.1 VAE at its real width, so a LATENT of the pack can be decoded natively from the same file."""
    import dataclasses
    import tempfile

    from .text import tokenizer_from_sentencepiece
    from .tiny import SINGLE_FILE_TINY, build_tiny_wan

    models_dir = Path(models_dir)
    spiece = tiny_sentencepiece_model()
    tokenizer = tokenizer_from_sentencepiece(spiece)
    spec = dataclasses.replace(SINGLE_FILE_TINY, vae_base_dim=96)  # the real Wan2.1 VAE's width
    written = {}
    with tempfile.TemporaryDirectory() as work:
        for kind in ("t2v", "i2v"):
            folder = build_tiny_wan(Path(work) / kind, seed=seed, tokenizer=tokenizer,
                                    spec=dataclasses.replace(spec, image_to_video=kind == "i2v"))
            files = export_single_files(folder, Path(work) / f"{kind}-files", "fp8_scaled", spiece_model=spiece)
            for argument, path in files.items():
                name = COMFY_ORG_NAMES.get((argument, kind))
                if name is None:
                    continue
                target = models_dir / COMFY_FOLDERS[argument] / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
                written[name] = target
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m video_offload.offload.families.wan.comfy_export <ComfyUI/models>")
    for name, path in write_tiny_comfyui_models(sys.argv[1]).items():
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")

"""Single files for tests: a tiny sentencepiece model, folders holding the numbers Comfy-Org-style files hold
(shared by ``test_single_files`` and ``test_workflows``; the files themselves come from ``comfy_export``), and the
CPU float32 generator the single-file tests of each family open their files or folders with."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from video_offload.offload.families.wan.comfy_export import KEY_LAYOUTS

def generator_for(source, **options):
    """A float32 ``VideoGenerator`` on the CPU: from single files when ``source`` maps loader arguments (``dit``,
    ``dit_2``, ``text_encoder``...) to paths, else from the Diffusers folder ``source``."""
    from video_offload import VideoGenerator
    from video_offload.offload import OffloadManager

    manager = OffloadManager("cpu")
    if isinstance(source, dict):
        return VideoGenerator.from_files(**{k: str(v) for k, v in source.items()}, precision="float32",
                                         manager=manager, **options)
    return VideoGenerator.from_pretrained(source, precision="float32", manager=manager, **options)


LAYOUTS = ("bf16", "fp16", "fp8_e4m3fn", "fp8_scaled")
FOLDER_NAMES = {"dit": "transformer", "dit_2": "transformer_2", "text_encoder": "text_encoder", "vae": "vae",
                "image_encoder": "image_encoder"}
TEXT = """A curious raccoon peers through a vibrant field of yellow sunflowers.
A majestic lion strides across the golden savanna at dawn.
Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality.
The cat and the dog play with light in the video of a field, 1 2 3!"""


def train_sentencepiece() -> bytes:
    """A tiny SentencePiece model, trained in milliseconds (what ComfyUI stores as ``spiece_model``)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=buffer, vocab_size=90, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
    )
    return buffer.getvalue()


def comfyui_dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI 0.3.64 (comfy/ops.py, scaled_fp8_op): cast_bias_weight casts the stored weight to the compute dtype,
    then ``weight * scale_weight.to(weight.dtype)``; without the ``scaled_fp8`` marker there is no scale."""
    weight = weight.to(dtype)
    return weight if scale is None else weight * scale.to(dtype)



def reference_folder(folder: Path, paths: dict[str, Path], target: Path) -> Path:
    """A copy of ``folder`` whose weights are the numbers the single files hold, widened to float32 the way ComfyUI
    widens them: each tensor read from its file under its original key (``comfy_export``'s layout, written
    independently of the loader's diffusers conversion) and dequantised with ComfyUI's rule."""
    shutil.copytree(folder, target)
    for argument, path in paths.items():
        component = FOLDER_NAMES[argument]
        weights_file = next((target / component).glob("*.safetensors"))
        names = load_file(str(weights_file))
        with safe_open(str(path), "pt") as handle:
            keys = set(handle.keys())
            prefix = "model.diffusion_model." if "model.diffusion_model.patch_embedding.weight" in keys else ""
            scaled = "scaled_fp8" in keys
            rebuilt = {}
            for name in names:
                key_of = KEY_LAYOUTS["transformer" if component == "transformer_2" else component]
                key = prefix + key_of("shared.weight" if name == "encoder.embed_tokens.weight" else name)
                stored = handle.get_tensor(key)
                scale_key = key[: -len("weight")] + "scale_weight"
                scale = handle.get_tensor(scale_key) if scaled and scale_key in keys else None
                rebuilt[name] = comfyui_dequantize(stored, scale, torch.float32).contiguous()
        save_file(rebuilt, str(weights_file), metadata={"format": "pt"})
    return target


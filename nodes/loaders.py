"""Load Model and Offload Settings: where a graph's model comes from and where its weights will live."""

from __future__ import annotations

import dataclasses

from ..offload.config import OffloadConfig
from ..offload.loading import Precision
from ._host import in_comfyui, list_model_folders, resolve_model_folder, shared_manager
from .handles import MODEL_TYPE, ModelHandle

CATEGORY = "Video Offload"


class LoadModel:
    """Registers a Diffusers-format Wan2.1 folder. Weights are read when a stage first needs them."""

    @classmethod
    def INPUT_TYPES(cls):
        if in_comfyui():
            model = (list_model_folders(), {"tooltip": "A Diffusers-format Wan2.1 folder in ComfyUI/models/diffusers."})
        else:
            model = ("STRING", {"default": "", "tooltip": "Path to a Diffusers-format Wan2.1 folder."})
        return {
            "required": {
                "model_name": model,
                "precision": (["auto", "bfloat16", "float16", "float32"], {
                    "default": "auto",
                    "tooltip": "DiT and text encoder weights. auto = bfloat16 on a GPU (Wan's native), float32 on CPU.",
                }),
                "vae_precision": (["float32", "bfloat16", "float16"], {
                    "default": "float32",
                    "tooltip": "VAE and image encoder. float32 is Wan's reference; bfloat16 halves their memory.",
                }),
            }
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with FastVideo's default offload options; change them with Offload Settings.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load a Wan2.1 text-to-video or image-to-video model (safetensors only)."

    def load(self, model_name, precision, vae_precision):
        manager = shared_manager()
        model = manager.load(resolve_model_folder(model_name), Precision(dit=precision, vae=vae_precision))
        return (ModelHandle(manager, model, OffloadConfig()),)


def _flag(default: bool, tooltip: str):
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


class OffloadSettings:
    """The seven FastVideo offload options (same names and defaults), plus the GPU count and streaming knobs."""

    @classmethod
    def INPUT_TYPES(cls):
        d = OffloadConfig()
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Model."}),
                "mode": (["manual", "auto"], {"default": "manual", "tooltip":
                    "manual: use the options below. auto: start with everything on the GPU and, on each "
                    "out-of-memory, turn on the next option of the recommended order (logged); the seven options "
                    "below are then ignored."}),
                "num_gpus": ("INT", {"default": d.num_gpus, "min": 1, "max": 64, "tooltip":
                    "GPUs to use. More than one needs use_fsdp_inference (and dit_layerwise_offload off)."}),
                "use_fsdp_inference": _flag(d.use_fsdp_inference,
                    "Shard the DiT over the GPUs (FSDP); each layer is gathered just before it runs. "
                    "Recommended with several GPUs."),
                "dit_cpu_offload": _flag(d.dit_cpu_offload,
                    "FSDP only: shards live in CPU memory and move per layer. Saves the most VRAM, costs speed. "
                    "No effect on one GPU."),
                "dit_layerwise_offload": _flag(d.dit_layerwise_offload,
                    "One GPU: DiT blocks live in CPU memory and stream in one block ahead of compute. "
                    "Near-resident speed in a few GiB. Not with FSDP."),
                "text_encoder_cpu_offload": _flag(d.text_encoder_cpu_offload,
                    "Keep the text encoder on the CPU and encode there: slower encoding, ~11 GiB less VRAM for "
                    "UMT5-XXL. Turn on last."),
                "image_encoder_cpu_offload": _flag(d.image_encoder_cpu_offload,
                    "Image-to-video: keep the image encoder in CPU memory, copy it in for the encode only."),
                "vae_cpu_offload": _flag(d.vae_cpu_offload,
                    "Keep the VAE in CPU memory and copy it in for the decode only (costs a PCIe copy per use)."),
                "pin_cpu_memory": _flag(d.pin_cpu_memory,
                    "Page-lock CPU copies: about twice the PCIe speed and asynchronous copies. Uses locked RAM."),
                "prefetch_depth": ("INT", {"default": d.prefetch_depth, "min": 1, "max": 8, "tooltip":
                    "Layerwise: blocks copied ahead of the running one. 1 is enough on PCIe 4/5; 2 smooths slow links."}),
                "resident_blocks": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                    "Layerwise: DiT blocks kept on the GPU (the rest stream). More = faster on short clips, more VRAM."}),
                "auto_resident_blocks": ("BOOLEAN", {"default": False, "tooltip":
                    "Layerwise: keep as many blocks on the GPU as free memory allows after measuring one step "
                    "(overrides resident_blocks)."}),
            }
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Where the weights live. One GPU: layerwise, then image encoder + VAE offload, then text encoder offload. "
        "Several GPUs: FSDP (layerwise and DiT CPU offload off), then encoders/VAE, then dit_cpu_offload."
    )

    def configure(self, model: ModelHandle, mode: str, auto_resident_blocks: bool, resident_blocks: int, **options):
        config = OffloadConfig(
            resident_blocks="auto" if auto_resident_blocks else resident_blocks, auto_offload=mode == "auto", **options
        )
        return (dataclasses.replace(model, config=config),)

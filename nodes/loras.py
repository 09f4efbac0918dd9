"""Load LoRA: a LoRA file from ComfyUI's loras folder, with a strength, for one expert or every DiT of the model."""

from __future__ import annotations

import dataclasses

from ..offload.errors import ConfigError
from ..offload.pipeline.loras import MAX_STRENGTH, check_strength, read_lora
from ._host import in_comfyui, list_lora_files, resolve_lora
from .handles import MODEL_TYPE, ModelHandle

CATEGORY = "Video Offload/loaders"
EXPERTS = ("all", "high_noise", "low_noise")
"""Which DiT a LoRA patches. Wan2.2 A14B has two experts (ComfyUI's templates load a LoRA per expert: one node
each); ``high_noise`` is the first (or only) DiT, ``transformer``, ``low_noise`` the second, ``transformer_2``."""


def dits_for(handle: ModelHandle, expert: str) -> tuple[str, ...]:
    names = handle.model.dit_names
    if expert == "all":
        return names
    if expert == "high_noise":
        return names[:1]
    if expert == "low_noise" and "transformer_2" in names:
        return ("transformer_2",)
    raise ConfigError("expert", expert, f"{handle.model.name} has one DiT, no low-noise expert",
                      'pick "all" (or "high_noise") for a single-DiT model')


class LoadLoRA:
    """Like ComfyUI's LoraLoaderModelOnly: adds a LoRA to the model that flows through. The weights are not
    touched: the LoRA is added on the GPU to each block as it arrives, so changing it or its strength reloads
    nothing."""

    @classmethod
    def INPUT_TYPES(cls):
        if in_comfyui():
            lora = (list_lora_files(), {"tooltip": "A LoRA in ComfyUI/models/loras (e.g. "
                                        "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors)."})
        else:
            lora = ("STRING", {"default": "", "tooltip": "Path to a LoRA .safetensors file."})
        return {"required": {
            "model": (MODEL_TYPE, {"tooltip": "From a model loader, Offload Settings or another Load LoRA."}),
            "lora_name": lora,
            "strength": ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01,
                                   "tooltip": "1.0 applies the LoRA as trained, 0 turns it off; changing it reloads "
                                              "nothing."}),
            "expert": (list(EXPERTS), {"default": "all", "tooltip":
                "Which DiT it patches. Wan2.2 A14B: high_noise or low_noise (one Load LoRA per expert, as ComfyUI's "
                "templates do); all: every DiT of the model."}),
        }}

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA added; the input is unchanged.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Add a LoRA (ComfyUI/kohya/lightx2v formats, safetensors) to the model at a strength. Applied on "
                   "the GPU as each block arrives: RAM holds the model once, and a new strength reloads nothing.")

    def load(self, model: ModelHandle, lora_name: str, strength: float, expert: str):
        strength = check_strength(strength)
        path = resolve_lora(lora_name)
        added = tuple((dit, read_lora(model.model, dit, path), strength) for dit in dits_for(model, expert))
        return (dataclasses.replace(model, loras=model.loras + added),)

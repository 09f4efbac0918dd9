"""Load Model and Offload Settings: where a graph's model comes from and where its weights will live."""

from __future__ import annotations

import dataclasses

from ..offload.config import PRECISIONS, OffloadConfig, Precision, option_specs
from ..offload.errors import ConfigError
from ..offload.pipeline.stages import load_model
from ._host import (
    FILE_FOLDER_KEYS,
    in_comfyui,
    list_component_files,
    list_model_folders,
    resolve_component,
    resolve_model_folder,
    shared_manager,
)
from .handles import COMPONENT_TYPES, MODEL_TYPE, ComponentFile, ModelHandle

CATEGORY = "Video Offload"
LOADERS = CATEGORY + "/loaders"


def precision_widgets() -> dict[str, tuple]:
    return {
        "precision": (list(PRECISIONS), {
            "default": "auto",
            "tooltip": "DiT and text encoder compute dtype. auto = bfloat16 on a GPU (Wan's native), float32 on CPU. "
                       "fp8 files stay fp8 in RAM and are widened to this on the GPU.",
        }),
        "vae_precision": (list(PRECISIONS[1:][::-1]), {
            "default": "float32",
            "tooltip": "VAE and image encoder. float32 is Wan's reference; bfloat16 halves their memory.",
        }),
    }


class LoadModel:
    """Registers a Diffusers-format Wan2.1 folder. Weights are read when a stage first needs them."""

    @classmethod
    def INPUT_TYPES(cls):
        if in_comfyui():
            model = (list_model_folders(), {"tooltip": "A Diffusers-format Wan2.1 folder in ComfyUI/models/diffusers."})
        else:
            model = ("STRING", {"default": "", "tooltip": "Path to a Diffusers-format Wan2.1 folder."})
        return {"required": {"model_name": model, **precision_widgets()}}

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with FastVideo's default offload options; change them with Offload Settings.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load a Wan2.1 text-to-video or image-to-video model (safetensors only)."

    def load(self, model_name, precision, vae_precision):
        manager = shared_manager()
        model = load_model(manager, resolve_model_folder(model_name), Precision(dit=precision, vae=vae_precision))
        return (ModelHandle(manager, model, OffloadConfig()),)


class _ComponentLoader:
    """A component's single file from its ComfyUI model folder, like ComfyUI's own loaders (or, from the same list,
    a Diffusers folder's copy of that component). Only resolves the name: Wan Model from Files reads and checks."""

    ARGUMENT = ""
    WIDGET = ""
    EXAMPLE = ""
    FUNCTION = "load"
    CATEGORY = LOADERS

    @classmethod
    def INPUT_TYPES(cls):
        folder = FILE_FOLDER_KEYS[cls.ARGUMENT]
        if in_comfyui():
            choices = (list_component_files(cls.ARGUMENT), {"tooltip":
                f"A file in ComfyUI/models/{folder} (e.g. {cls.EXAMPLE}), or a Diffusers folder's {cls.ARGUMENT}."})
        else:
            choices = ("STRING", {"default": "", "tooltip": f"Path to a single file such as {cls.EXAMPLE}."})
        return {"required": {cls.WIDGET: choices}}

    def load(self, **widgets):
        return (ComponentFile(self.ARGUMENT, resolve_component(self.ARGUMENT, self.WIDGET, widgets[self.WIDGET])),)


class LoadDiT(_ComponentLoader):
    ARGUMENT, WIDGET, EXAMPLE = "dit", "dit_name", "wan2.1_t2v_14B_fp8_scaled.safetensors"
    RETURN_TYPES = (COMPONENT_TYPES["dit"],)
    RETURN_NAMES = ("dit",)
    DESCRIPTION = "Pick the Wan DiT from ComfyUI/models/diffusion_models (bf16, fp16, fp8_e4m3fn or fp8_scaled)."


class LoadTextEncoder(_ComponentLoader):
    ARGUMENT, WIDGET, EXAMPLE = "text_encoder", "text_encoder_name", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    RETURN_TYPES = (COMPONENT_TYPES["text_encoder"],)
    RETURN_NAMES = ("text_encoder",)
    DESCRIPTION = "Pick the UMT5-XXL text encoder from ComfyUI/models/text_encoders (its tokenizer is inside the file)."


class LoadVAE(_ComponentLoader):
    ARGUMENT, WIDGET, EXAMPLE = "vae", "vae_name", "wan_2.1_vae.safetensors"
    RETURN_TYPES = (COMPONENT_TYPES["vae"],)
    RETURN_NAMES = ("vae",)
    DESCRIPTION = ("Pick the Wan VAE from ComfyUI/models/vae: wan_2.1_vae for Wan2.1 (and Wan2.2 A14B), wan2.2_vae for "
                   "Wan2.2 TI2V-5B.")


class LoadImageEncoder(_ComponentLoader):
    ARGUMENT, WIDGET, EXAMPLE = "image_encoder", "clip_name", "clip_vision_h.safetensors"
    RETURN_TYPES = (COMPONENT_TYPES["image_encoder"],)
    RETURN_NAMES = ("clip_vision",)
    DESCRIPTION = "Pick the CLIP vision encoder of image-to-video models from ComfyUI/models/clip_vision."


class WanModelFromFiles:
    """Assembles a Wan model from its components' files: the kind (T2V/I2V, 1.3B/14B) is read from the DiT's keys
    and shapes, every file is checked against it (headers only), and weights are read when a stage first needs them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (COMPONENT_TYPES["dit"], {"tooltip": "From Load Wan DiT."}),
                "text_encoder": (COMPONENT_TYPES["text_encoder"], {"tooltip": "From Load Text Encoder."}),
                "vae": (COMPONENT_TYPES["vae"], {"tooltip": "From Load VAE."}),
                **precision_widgets(),
            },
            "optional": {
                "clip_vision": (COMPONENT_TYPES["image_encoder"], {"tooltip":
                    "Wan2.1 image-to-video models only: from Load CLIP Vision."}),
                "dit_2": (COMPONENT_TYPES["dit"], {"tooltip":
                    "Wan2.2 A14B only: the low-noise expert (wan2.2_*_low_noise_14B_*), from a second Load Wan DiT; "
                    "dit is then the high-noise expert."}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with FastVideo's default offload options; change them with Offload Settings.",)
    FUNCTION = "assemble"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A Wan2.1 model from the single files ComfyUI uses (Comfy-Org's repackaged files); fp8 weights stay "
                   "fp8 in RAM and over PCIe.")

    def assemble(self, dit: ComponentFile, text_encoder: ComponentFile, vae: ComponentFile, precision, vae_precision,
                 clip_vision: ComponentFile | None = None, dit_2: ComponentFile | None = None):
        files = {part.argument: part.path for part in (dit, text_encoder, vae, clip_vision) if part is not None}
        if dit_2 is not None:
            files["dit_2"] = dit_2.path
        manager = shared_manager()
        model = load_model(manager, files, Precision(dit=precision, vae=vae_precision))
        return (ModelHandle(manager, model, OffloadConfig()),)


def _auto_widget(name: str) -> str:
    return f"auto_{name}"


def offload_widgets() -> dict[str, tuple]:
    """One widget per ``OffloadConfig`` option (``config.option``: the one declaration), with its doc as tooltip.
    An option that may be ``"auto"`` gets a number widget plus an ``auto_<name>`` toggle."""
    widgets: dict[str, tuple] = {}
    for spec in option_specs():
        if spec.kind == "bool":
            options = {"default": spec.default, "tooltip": spec.tooltip}
            if spec.labels:
                options.update(label_off=spec.labels[0], label_on=spec.labels[1])
            widgets[spec.name] = ("BOOLEAN", options)
        elif spec.kind == "choice":
            widgets[spec.name] = (list(spec.choices), {"default": spec.default, "tooltip": spec.tooltip})
        else:
            default = 0 if spec.default == "auto" else spec.default
            widgets[spec.name] = ("INT", {"default": default, "min": spec.low, "max": spec.high, "tooltip": spec.tooltip})
            if spec.auto:
                widgets[_auto_widget(spec.name)] = ("BOOLEAN", {"default": spec.default == "auto", "tooltip":
                    f'{spec.name}="auto": {spec.doc} (overrides {spec.name})'})
    return widgets


class OffloadSettings:
    """The seven FastVideo offload options (same names and defaults), plus the GPU count and streaming knobs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL_TYPE, {"tooltip": "From Load Model."}), **offload_widgets()}}

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Where the weights live. One GPU: layerwise, then image encoder + VAE offload, then text encoder offload. "
        "Several GPUs: FSDP (layerwise and DiT CPU offload off), then encoders/VAE, then dit_cpu_offload."
    )

    def configure(self, model: ModelHandle, **widgets):
        options = {}
        for spec in option_specs():
            value = widgets.get(spec.name, spec.default)
            if spec.auto and widgets.get(_auto_widget(spec.name)):
                value = "auto"
            options[spec.name] = value
        unknown = set(widgets) - set(options) - {_auto_widget(s.name) for s in option_specs() if s.auto}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(name, widgets[name], "is not an Offload Settings input", "reload the node from the menu")
        return (dataclasses.replace(model, config=OffloadConfig(**options)),)

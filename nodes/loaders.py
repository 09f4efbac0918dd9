"""Load Model and Offload Settings: where a graph's model comes from and where its weights will live."""

from __future__ import annotations

import dataclasses

from ..offload.config import PRECISIONS, OffloadConfig, Precision, option_specs
from ..offload.errors import ConfigError
from ..offload.pipeline.stages import load_model
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
                "precision": (list(PRECISIONS), {
                    "default": "auto",
                    "tooltip": "DiT and text encoder weights. auto = bfloat16 on a GPU (Wan's native), float32 on CPU.",
                }),
                "vae_precision": (list(PRECISIONS[1:][::-1]), {
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
        model = load_model(manager, resolve_model_folder(model_name), Precision(dit=precision, vae=vae_precision))
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

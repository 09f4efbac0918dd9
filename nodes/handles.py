"""What flows between the pack's nodes. Frozen: a node never changes what it was given, it returns a new one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..offload.config import OffloadConfig
from ..offload.core.loaded_model import LoadedModel
from ..offload.core.manager import OffloadManager
from ..offload.core.weight_patches import PatchFile, PatchSet

MODEL_TYPE = "VO_MODEL"
CONDITIONING_TYPE = "VO_CONDITIONING"


@dataclass(frozen=True)
class ModelHandle:
    """A loaded model, the manager that places it, the offload options to place it with, and the LoRAs to apply."""

    manager: OffloadManager
    model: LoadedModel
    config: OffloadConfig
    loras: tuple[tuple[str, PatchFile, float], ...] = ()
    """(DiT name, LoRA read for it, strength), in the order the Load LoRA nodes added them."""

    def lora_patches(self) -> dict[str, PatchSet]:
        """The LoRAs per DiT, as the sampler takes them."""
        found: dict[str, list[tuple[PatchFile, float]]] = {}
        for dit, patch_file, strength in self.loras:
            found.setdefault(dit, []).append((patch_file, strength))
        return {dit: PatchSet(tuple(entries)) for dit, entries in found.items()}


COMPONENT_TYPES = {
    "dit": "VO_DIT",
    "text_encoder": "VO_TEXT_ENCODER",
    "vae": "VO_VAE",
    "image_encoder": "VO_CLIP_VISION",
}
"""One link type per component, so a graph cannot wire a VAE file into the DiT input."""


@dataclass(frozen=True)
class ComponentFile:
    """Where one component comes from: a single file from ComfyUI's model folders, or a Diffusers folder. Nothing is
    read until Wan Model from Files assembles the model."""

    argument: str
    """``dit``, ``text_encoder``, ``vae`` or ``image_encoder``."""
    path: Path

"""LoRAs chosen by a user, read for a model's DiTs: what ``VideoGenerator(loras=...)``, ``--lora FILE[:STRENGTH]``
and the Load LoRA node share.

A choice names a file, a strength and the DiT it patches, by component name (``transformer``; Wan2.2 A14B's
low-noise expert is ``transformer_2``), or every DiT of the model when none is named. Files are read here, once,
onto the DiT's own tensor names by the model family's reader (``ModelSpec.read_lora``); what reaches the sampler is
a ``PatchSet`` per DiT (``core.weight_patches``), which the offload manager adds to the device copies only - so a new
LoRA or strength never reloads the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.loaded_model import LoadedModel
from ..core.weight_patches import PatchFile, PatchSet
from ..errors import ConfigError

MAX_STRENGTH = 100.0
"""ComfyUI's LoraLoaderModelOnly bound (strength_model: -100..100)."""


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA file for one DiT (or every DiT) of a model, with its strength."""

    path: Path
    strength: float = 1.0
    dit: str | None = None
    """The DiT component it patches (``transformer``, ``transformer_2``); None: every DiT of the model."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path).strip():
            raise ConfigError("lora", self.path, "must be a path to a .safetensors LoRA file", "pass a file path")
        object.__setattr__(self, "path", Path(self.path).expanduser())
        check_strength(self.strength)

    @classmethod
    def parse(cls, text: str) -> LoraChoice:
        """``[DIT=]FILE[:STRENGTH]`` (the CLI's ``--lora``): ``lightx2v.safetensors``, ``lightx2v.safetensors:0.8``,
        ``transformer_2=low_noise.safetensors:1``. The strength is what follows the last colon when it reads as a
        number, so Windows paths (``C:\\...``) work; ``DIT=`` is a component name (letters, digits, ``_``)."""
        dit, equals, rest = str(text).partition("=")
        if not equals or not dit.replace("_", "").isalnum():
            dit, rest = None, str(text)
        path, colon, tail = rest.rpartition(":")
        if colon:
            try:
                strength = float(tail)
            except ValueError:
                pass
            else:
                return cls(Path(path), strength, dit)
        return cls(Path(rest), 1.0, dit)


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or abs(strength) > MAX_STRENGTH:
        raise ConfigError("strength", strength, f"must be a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}",
                          "use 1.0 for the LoRA as trained, 0 to turn it off")
    return float(strength)


def as_choice(item: Any) -> LoraChoice:
    """A ``LoraChoice`` from what a Python caller may pass: a choice, a path, ``(path, strength)`` or
    ``(path, strength, dit)``."""
    if isinstance(item, LoraChoice):
        return item
    if isinstance(item, (str, Path)):
        return LoraChoice(Path(item))
    if isinstance(item, tuple) and 1 <= len(item) <= 3:
        return LoraChoice(*item)
    raise ConfigError("loras", item, "each LoRA is a path, (path, strength) or (path, strength, dit)",
                      'pass e.g. loras=[("lightx2v.safetensors", 1.0)]')


def read_lora(model: LoadedModel, dit: str, path: str | Path) -> PatchFile:
    """Read one LoRA file onto DiT ``dit`` of ``model`` (shapes from the DiT built on the meta device: no weight
    is read)."""
    if model.spec.read_lora is None:
        raise ConfigError("lora", str(path), f"{model.spec.name} models take no LoRAs in this pack",
                          "remove the LoRA")
    check_dit(model, dit)
    component = model.spec.component(dit)
    skeleton = model.source.empty_model(component, model.dtypes.get(dit))
    shapes = {name: tuple(t.shape) for name, t in skeleton.named_parameters()}
    return model.spec.read_lora(Path(path), shapes, f"{model.name}/{dit}")


def check_dit(model: LoadedModel, dit: str) -> None:
    if dit not in model.dit_names:
        raise ConfigError("dit", dit, f"{model.name} has the DiT(s) {', '.join(model.dit_names)}",
                          "pick one of those (Wan2.2 A14B: transformer = high noise, transformer_2 = low noise)")


def lora_patches(model: LoadedModel, choices: Sequence[Any]) -> dict[str, PatchSet]:
    """Read every chosen file (each once per DiT it patches) and group them into one ``PatchSet`` per DiT."""
    entries: dict[str, list[tuple[PatchFile, float]]] = {}
    read: dict[tuple[Path, str], PatchFile] = {}
    for choice in map(as_choice, choices):
        dits = model.dit_names if choice.dit is None else (choice.dit,)
        for dit in dits:
            key = (choice.path, dit)
            if key not in read:
                read[key] = read_lora(model, dit, choice.path)
            entries.setdefault(dit, []).append((read[key], choice.strength))
    return {dit: PatchSet(tuple(pairs)) for dit, pairs in entries.items()}


def check_patches(model: LoadedModel, patches: Mapping[str, PatchSet] | None, distributed: bool = False) -> dict[str, PatchSet]:
    """``patches`` keyed by DiT names of ``model`` (a ConfigError names a wrong one), and applicable with the offload
    options (``distributed``: the DiTs are sharded over GPUs, where no LoRA is applied yet)."""
    for dit in patches or {}:
        check_dit(model, dit)
    if distributed and any((patches or {}).values()):
        raise ConfigError("use_fsdp_inference", True, "LoRAs are not applied to DiTs sharded over GPUs yet",
                          "turn use_fsdp_inference off (layerwise offload on one GPU applies them), or remove the LoRA")
    return dict(patches or {})

"""Wan LoRA files as users hold them, read onto the diffusers ``WanTransformer3DModel``'s tensor names.

The key formats (what ComfyUI's ``LoraLoaderModelOnly`` accepts for Wan, ``comfy/lora.py``, and what the lightx2v
distillation LoRAs and musubi-tuner write):

- native Wan module names with the ``diffusion_model.`` prefix: ``diffusion_model.blocks.0.self_attn.q`` followed by
  ``.lora_up.weight`` / ``.lora_down.weight`` or ``.lora_B.weight`` / ``.lora_A.weight``, and ``.alpha``;
- kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_up.weight`` (the native name, dots as underscores);
- full deltas: ``<module>.diff`` (added to the weight) and ``<module>.diff_b`` (added to the bias);
- diffusers' own LoRA files: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (already the model's names).

Native names are mapped to the diffusers names by the same conversion single-file DiTs use (``files.converted_names``
over diffusers' ``convert_wan_transformer_to_diffusers``), run on placeholders: nothing is duplicated here. A kohya
name loses the dots, so each way of putting them back is tried and the one that names a tensor of this model wins.

The arithmetic is ComfyUI's: ``W + strength * (alpha / rank) * up @ down`` (``alpha / rank`` = 1 without alpha,
``rank = down.shape[0]``), ``W + strength * diff``, ``b + strength * diff_b``. Keys that name nothing in this model
are reported as ComfyUI reports them (``lora key not loaded``, a warning); a file none of whose keys fit is an error
naming the file - it is for another model. Keys of a kind this pack does not apply (DoRA's ``dora_scale``) are an
error rather than a silently different result.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...core.spec import FileTensor
from ...core.weight_patches import Delta, LowRank, PatchFile, Term
from ...errors import ModelLoadError
from ...weights.safetensors_file import SafetensorsFile
from .files import converted_names

logger = logging.getLogger(__name__)

NATIVE_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))
"""(up, down) suffixes of a low-rank pair, in both spellings."""
SUFFIXES = {".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b", ".dora_scale": "dora_scale"}
MAX_KOHYA_JOINS = 2**12
"""A kohya name with more underscores than this many ways to re-dot it names no Wan tensor."""


@dataclass
class _Module:
    """What a file holds for one module of the model."""

    keys: list[str] = field(default_factory=list)
    up: str | None = None
    down: str | None = None
    alpha: str | None = None
    diff: str | None = None
    diff_b: str | None = None
    dora_scale: str | None = None


def _split(key: str) -> tuple[str, str] | None:
    """``(module, part)`` of a LoRA key, or None when the key has no suffix this reader knows."""
    for up, down in PAIRS:
        if key.endswith(up):
            return key[: -len(up)], "up"
        if key.endswith(down):
            return key[: -len(down)], "down"
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _native_names(modules: list[str]) -> dict[str, str]:
    """Native Wan module name -> diffusers module name, by diffusers' single-file conversion (on placeholders)."""
    placeholders = {f"{m}.weight": FileTensor((1,), torch.float32) for m in modules}
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    mapping = converted_names(convert_wan_transformer_to_diffusers, placeholders)
    return {key.removesuffix(".weight"): name.removesuffix(".weight") for name, key in mapping.items()}


def _kohya_candidates(name: str) -> list[str]:
    parts = name.split("_")
    if 2 ** (len(parts) - 1) > MAX_KOHYA_JOINS:
        return []
    found = []
    for joins in itertools.product("._", repeat=len(parts) - 1):
        found.append(parts[0] + "".join(j + p for j, p in zip(joins, parts[1:])))
    return found


def _resolve(groups: dict[tuple[str, str], _Module], modules: set[str]) -> dict[tuple[str, str], str]:
    """(prefix, name in the file) -> the model's module name, for the groups that name a module of this model."""
    native = [name for prefix, name in groups if prefix == NATIVE_PREFIX]
    kohya = {name: _kohya_candidates(name) for prefix, name in groups if prefix == KOHYA_PREFIX}
    converted = _native_names(native + [c for cs in kohya.values() for c in cs])
    resolved = {}
    for prefix, name in groups:
        if prefix == DIFFUSERS_PREFIX:
            target = name if name in modules else None
        elif prefix == NATIVE_PREFIX:
            target = converted.get(name) if converted.get(name) in modules else None
        else:
            hits = {converted.get(c) for c in kohya[name]} & modules
            target = hits.pop() if len(hits) == 1 else None
        if target is not None:
            resolved[(prefix, name)] = target
    return resolved


def read_wan_lora(path: str | Path, shapes: Mapping[str, tuple[int, ...]], what: str = "this model") -> PatchFile:
    """Read LoRA file ``path`` for a Wan DiT whose tensors (diffusers names) have ``shapes``; return its terms at
    strength 1. ``what`` names the model in messages. Raises ``ModelLoadError`` naming the file when none of its keys
    fit the model, when a factor's shape does not fit its weight, or for keys of an unsupported kind."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelLoadError(f"LoRA {path.name}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can "
                             "run code when loaded). Fix: use the .safetensors version of the LoRA.")
    with SafetensorsFile(path) as handle:
        keys = list(handle.entries)
        groups: dict[tuple[str, str], _Module] = {}
        unknown: list[str] = []
        for key in keys:
            prefix = next((p for p in (NATIVE_PREFIX, KOHYA_PREFIX, DIFFUSERS_PREFIX) if key.startswith(p)), None)
            split = _split(key[len(prefix):]) if prefix else None
            if split is None:
                unknown.append(key)
                continue
            module, part = split
            group = groups.setdefault((prefix, module), _Module())
            group.keys.append(key)
            setattr(group, part, key)
        modules = {name.rpartition(".")[0] for name in shapes}
        resolved = _resolve(groups, modules)
        targets: dict[str, list[Term]] = {}
        for (prefix, name), group in groups.items():
            module = resolved.get((prefix, name))
            if module is None:
                unknown += group.keys
                continue
            if group.dora_scale is not None:
                raise ModelLoadError(f"LoRA {path.name}: {group.dora_scale} is a DoRA key, which this pack does not "
                                     "apply. Fix: use a plain LoRA (no dora_scale keys).")
            _add_terms(handle, path, group, module, shapes, targets, unknown)
    if not targets:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise ModelLoadError(
            f"LoRA {path.name} does not fit {what}: none of its {len(keys)} keys names a tensor of it ({sample}...). "
            "Fix: pick a LoRA made for this model (a Wan2.1/Wan2.2 DiT of this size and kind)."
        )
    if unknown:
        logger.warning("LoRA %s: %d keys not loaded (they name nothing in %s), e.g. lora key not loaded: %s",
                       path.name, len(unknown), what, ", ".join(sorted(unknown)[:10]))
    logger.info("LoRA %s: %d tensors of %s patched", path.name, len(targets), what)
    return PatchFile(path.name, {name: tuple(terms) for name, terms in targets.items()})


def _add_terms(handle: SafetensorsFile, path: Path, group: _Module, module: str, shapes: Mapping[str, tuple[int, ...]],
               targets: dict[str, list[Term]], unknown: list[str]) -> None:
    weight, bias = f"{module}.weight", f"{module}.bias"
    terms: list[tuple[str, str, Term]] = []
    if (group.up is None) != (group.down is None):
        present = group.up or group.down
        raise ModelLoadError(f"LoRA {path.name}: {present} has no matching "
                             f"{'down/A' if group.down is None else 'up/B'} factor. Fix: the file is incomplete; "
                             "download it again.")
    if group.up is not None:
        down = handle.read(group.down)
        scale = 1.0
        if group.alpha is not None:
            scale = float(handle.read(group.alpha).float().reshape(-1)[0]) / down.shape[0]
        terms.append((group.up, weight, LowRank(handle.read(group.up), down, scale)))
    elif group.alpha is not None:
        unknown.append(group.alpha)  # an alpha without its pair patches nothing
    if group.diff is not None:
        terms.append((group.diff, weight, Delta(handle.read(group.diff))))
    if group.diff_b is not None:
        terms.append((group.diff_b, bias, Delta(handle.read(group.diff_b))))
    for key, name, term in terms:
        if name not in shapes:
            unknown.append(key)
            continue
        problem = term.check(name, shapes[name])
        if problem:
            raise ModelLoadError(f"LoRA {path.name} does not fit this model: {key}: {problem}. Fix: pick a LoRA made "
                                 "for this model (its size and kind: 1.3B/5B/14B, T2V/I2V).")
        targets.setdefault(name, []).append(term)

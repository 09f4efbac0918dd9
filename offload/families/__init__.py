"""Model families: one folder per family (``wan/``), each a spec plus the steps only that family knows.

The registry maps what a model folder says it is (``model_index.json``) to a ``ModelSpec``. Families register
themselves when imported; a family defined elsewhere (a test's toy family, a plugin) calls :func:`register`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..core.spec import ModelSpec, NotThisFile, Role
from ..errors import ModelLoadError
from ..weights.diffusers_folder import DiffusersFolder
from ..weights.single_files import SingleFiles, is_bookkeeping, read_single_file

_lock = threading.Lock()
_specs: list[ModelSpec] = []
_hints: dict[str, str] = {}


def register(spec: ModelSpec, hint: str = "") -> ModelSpec:
    """Make ``spec`` known (idempotent by name). ``hint`` describes the family's folders for error messages."""
    with _lock:
        _specs[:] = [s for s in _specs if s.name != spec.name] + [spec]
        if hint:
            _hints.setdefault(spec.family, hint)
    return spec


def unregister(name: str) -> None:
    with _lock:
        _specs[:] = [s for s in _specs if s.name != name]


def registered() -> tuple[ModelSpec, ...]:
    with _lock:
        return tuple(_specs)


def folder_hint() -> str:
    hints = list(dict.fromkeys(_hints.values())) or ["a Diffusers-format model folder"]
    return (
        f"point it at {' or '.join(hints)} that contains model_index.json and the subfolders of its components "
        "(transformer/, text_encoder/, tokenizer/, vae/, scheduler/ ...)"
    )


def spec_for_index(index: dict[str, Any], where: Path) -> ModelSpec:
    """The registered spec that reads a folder with this ``model_index.json``."""
    pipeline_class = index.get("_class_name")
    candidates = [s for s in registered() if s.pipeline_class == pipeline_class]
    for spec in reversed(candidates):  # the most specific (latest registered) first
        if spec.matches is None or spec.matches(index):
            return spec
    supported = sorted({s.pipeline_class for s in registered()})
    raise ModelLoadError(
        f"{where / 'model_index.json'} describes a {str(pipeline_class)[:80]!r}; this pack runs "
        f"{', '.join(supported)} folders. Fix: {folder_hint()}."
    )


def open_model(path: Any) -> tuple[DiffusersFolder, ModelSpec]:
    """Check ``path`` as a model folder of a registered family, before any weight is read; return its source and
    spec. Raises ``ModelLoadError`` naming what is wrong and the fix."""
    folder = DiffusersFolder.open(path, folder_hint())
    spec = spec_for_index(folder.index, folder.path)
    folder.check(spec)
    if spec.check_configs is not None:
        spec.check_configs(folder)  # configs vs bounds and headers, before anything is built
    return folder, spec


def open_files(files: dict[str, Any]) -> tuple[SingleFiles, ModelSpec]:
    """Check a model given as one file per component (``dit``, ``text_encoder``, ``vae``, ``image_encoder``), each
    a single ``.safetensors`` file as ComfyUI keeps them or a Diffusers folder; return its source and spec.

    The DiT decides the model: a folder by its ``model_index.json``, a file by the first registered spec whose DiT
    format recognises it. Reads headers only; raises ``ModelLoadError`` naming the file, what it is and the fix.
    """
    dit = files.get("dit")
    if dit in (None, ""):
        raise ModelLoadError("dit is missing: a model needs its DiT. Fix: pass dit= a diffusion_models file or a "
                             "Diffusers folder.")
    experts = 2 if files.get("dit_2") not in (None, "") else 1
    if isinstance(dit, (str, Path)) and Path(dit).expanduser().is_dir():
        folder = DiffusersFolder.open(dit, folder_hint())
        spec = spec_for_index(folder.index, folder.path)
    else:
        spec = spec_for_dit_file(dit, experts)
    return SingleFiles.open(spec, files), spec


def spec_for_dit_file(path: Any, experts: int = 1) -> ModelSpec:
    """The registered spec whose DiT format recognises the file (the most recently registered first), among the
    specs with ``experts`` DiTs: single files of a two-expert model (Wan2.2 A14B) look like one-DiT files, so the
    number of DiT files given decides."""
    file, entries = read_single_file(path, "dit")
    from ..core.spec import FileTensor

    tensors = {k: FileTensor(e.shape, e.dtype) for k, e in entries.items() if not is_bookkeeping(k)}
    reasons = []
    for spec in reversed(registered()):
        if len(spec.by_role(Role.DIT)) != experts:
            continue
        dit = spec.first(Role.DIT)
        fmt = spec.files.get(dit.name) if dit is not None else None
        if fmt is None or not hasattr(fmt, "recognise"):
            continue
        try:
            fmt.recognise(tensors)
        except NotThisFile as e:
            reasons.append((fmt.expected, str(e)))
            continue
        return spec
    if not reasons:
        raise ModelLoadError(f"{file}: no registered model family reads single files.")
    expected = " or ".join(dict.fromkeys(e for e, _ in reasons))
    why = reasons[0][1]
    raise ModelLoadError(f"{file} is not a DiT this pack runs ({why}). Fix: pick {expected}.")


from . import wan  # noqa: E402,F401 - the built-in families register themselves
